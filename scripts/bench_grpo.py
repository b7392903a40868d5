"""Throughput of our GRPO against TRL's GRPOTrainer on the same model, prompts and batch shape.

    pip install -e .[bench]          # TRL is a benchmark-only dependency
    python scripts/bench_grpo.py --steps 12 --repeats 2

Both trainers get: the built-in tiny Llama saved to a local directory (TRL cannot download), the
arithmetic task's training prompts, G completions per prompt, the same number of completions per
optimizer step, the same max_completion_length, temperature 1, beta (so both hold a reference
model), loss_type grpo, one thread each, no evaluation and no checkpoints inside the timed steps.
The first `--warmup` steps of every run are not timed. Completions/s and tokens/s are taken over
the timed steps, per wall-clock second and per CPU second of the process (read the latter on a
shared, loaded machine: other processes' load counts against neither side); tokens are the
completion tokens actually generated (each trainer's own `completions/mean_length`). Runs alternate ours / TRL `--repeats` times and the table shows the
median, so a noisy shared machine hurts both sides alike.

TRL >= 1.x no longer ships a PPO trainer (it was removed from `trl` and not kept in
`trl.experimental`), so there is no PPO comparison here; `--ppo` times our PPO alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def run_ours(args, model_dir: str, out: Path) -> dict:
    from rlhf import grpo
    from rlhf.runtime import make_config, read_jsonl

    # CPU seconds per step: from the start of make_batch (generation) to the end of train_step
    cpu, make_batch, train_step = [], grpo.make_batch, grpo.train_step

    def timed_make_batch(*a, **k):
        cpu.append(time.process_time())
        return make_batch(*a, **k)

    def timed_train_step(*a, **k):
        result = train_step(*a, **k)
        cpu[-1] = time.process_time() - cpu[-1]
        return result

    cfg = make_config(grpo.Config, dict(
        output_dir=str(out), model_name_or_path=model_dir, max_steps=args.steps, num_generations=args.num_generations,
        per_device_train_batch_size=args.completions, max_completion_length=args.max_completion_length,
        beta=args.beta, loss_type="grpo", learning_rate=1e-5, reward_funcs=["exact_match", "format"],
        num_eval_prompts=0, progress=False, report_to="none", seed=args.seed))
    grpo.make_batch, grpo.train_step = timed_make_batch, timed_train_step
    try:
        grpo.train(cfg)
    finally:
        grpo.make_batch, grpo.train_step = make_batch, train_step
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r][args.warmup:]
    seconds = sum(r["time/step_s"] for r in rows)
    tokens = sum(r["completions/mean_length"] * args.completions for r in rows)
    return {"seconds": seconds, "cpu_seconds": sum(cpu[args.warmup:]), "completions": len(rows) * args.completions,
            "tokens": tokens, "steps": len(rows)}


def run_trl(args, model_dir: str, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.tasks.arithmetic import exact_match_reward, format_reward, make_prompts

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.durations, self.cpu = None, [], []

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.durations.append(time.perf_counter() - self.begin[0])
            self.cpu.append(time.process_time() - self.begin[1])

    timer = StepTimer()
    n_prompts = args.steps * args.completions // args.num_generations
    dataset = Dataset.from_dict({"prompt": make_prompts(n_prompts * 2, args.seed)})
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.completions,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, beta=args.beta,
        loss_type="grpo", learning_rate=1e-5, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        seed=args.seed, disable_tqdm=True, bf16=False,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                          processing_class=AutoTokenizer.from_pretrained(model_dir),
                          reward_funcs=[exact_match_reward, format_reward], args=config, train_dataset=dataset,
                          callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    durations, lengths = timer.durations[args.warmup:], lengths[args.warmup:]
    return {"seconds": sum(durations), "cpu_seconds": sum(timer.cpu[args.warmup:]), "completions": len(durations) * args.completions,
            "tokens": sum(length * args.completions for length in lengths), "steps": len(durations)}


def run_ppo(args, model_dir: str, out: Path) -> dict:
    from rlhf import ppo
    from rlhf.runtime import make_config, read_jsonl

    cfg = make_config(ppo.Config, dict(
        output_dir=str(out), model_name_or_path=model_dir, max_steps=args.steps, per_device_train_batch_size=16,
        num_mini_batches=args.completions // 16, num_ppo_epochs=1, max_completion_length=args.max_completion_length,
        reward_funcs=["exact_match", "format"], num_eval_prompts=0, progress=False, report_to="none", seed=args.seed))
    ppo.train(cfg)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r][args.warmup:]
    return {"seconds": sum(r["time/step_s"] for r in rows), "completions": len(rows) * args.completions,
            "tokens": sum(r["completions/mean_length"] * args.completions for r in rows), "steps": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="", help="A causal LM directory (default: builtin:tiny saved to a temp dir).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--completions", type=int, default=64, help="Completions per optimizer step.")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ppo", action="store_true", help="Also time our PPO (no TRL counterpart, see the docstring).")
    parser.add_argument("--json", default="", help="Also write the results to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        if not model_dir:
            from rlhf.models import save_builtin_tiny

            model_dir = str(save_builtin_tiny(tmp / "tiny"))
        runners = {"ours (rlhf grpo)": run_ours, "TRL GRPOTrainer": run_trl}
        if args.ppo:
            runners["ours (rlhf ppo, 1 epoch)"] = run_ppo
        results = {name: [] for name in runners}
        for r in range(args.repeats):
            for name, fn in runners.items():
                results[name].append(fn(args, model_dir, tmp / f"{fn.__name__}_{r}"))

    def median_rate(runs, key, per="seconds"):
        return statistics.median(run[key] / run[per] for run in runs) if all(per in run for run in runs) else float("nan")

    print(f"\nGRPO throughput: {args.completions} completions/step (G={args.num_generations}), "
          f"max_completion_length={args.max_completion_length}, beta={args.beta}, {args.threads} thread(s), "
          f"{args.steps - args.warmup} timed steps x {args.repeats} repeats (median)\n")
    header = (f"| {'trainer':<26} | {'completions/s':>13} | {'tokens/s':>9} | {'s/step':>7} "
              f"| {'completions/CPU-s':>17} | {'tokens/CPU-s':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    table = {}
    for name, runs in results.items():
        cps, tps = median_rate(runs, "completions"), median_rate(runs, "tokens")
        cpu_cps, cpu_tps = median_rate(runs, "completions", "cpu_seconds"), median_rate(runs, "tokens", "cpu_seconds")
        table[name] = {"completions_per_s": cps, "tokens_per_s": tps, "s_per_step": args.completions / cps,
                       "completions_per_cpu_s": cpu_cps, "tokens_per_cpu_s": cpu_tps}
        print(f"| {name:<26} | {cps:>13.1f} | {tps:>9.1f} | {args.completions / cps:>7.3f} "
              f"| {cpu_cps:>17.1f} | {cpu_tps:>12.1f} |")
    ours, trl = table["ours (rlhf grpo)"], table["TRL GRPOTrainer"]
    print(f"\nratio ours / TRL: completions/s x{ours['completions_per_s'] / trl['completions_per_s']:.2f} (wall), "
          f"x{ours['completions_per_cpu_s'] / trl['completions_per_cpu_s']:.2f} (CPU: robust on a shared machine); "
          f"tokens/s x{ours['tokens_per_s'] / trl['tokens_per_s']:.2f} (wall)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": table, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
