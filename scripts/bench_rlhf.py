"""Throughput of our GRPO and PPO against TRL's GRPOTrainer and PPOTrainer on the same model, prompts and batch shape.

    pip install -e .[bench]          # TRL is a benchmark-only dependency
    python scripts/bench_rlhf.py --steps 12 --repeats 2

Both trainers get: the built-in tiny Llama saved to a local directory (TRL cannot download), the
arithmetic task's training prompts, G completions per prompt, the same number of completions per
optimizer step, the same max_completion_length, temperature 1, beta (so both hold a reference
model), loss_type grpo, no gradient checkpointing (TRL's GRPOConfig turns it on by default; a third row
shows TRL so), one thread each, no evaluation and no checkpoints inside the timed steps.
The first `--warmup` steps of every run are not timed. Completions/s and tokens/s are taken over
the timed steps, per wall-clock second and per CPU second of the process (read the latter on a
shared, loaded machine: other processes' load counts against neither side); tokens are the
completion tokens actually generated (each trainer's own `completions/mean_length`). Runs alternate
ours / TRL `--repeats` times and the table shows the median, so a noisy shared machine hurts both
sides alike. The last two columns split a step's CPU time:
all of it, and the part spent inside the transformers models' forward calls (every decode step
included) and backward passes, the work neither trainer can skip; once ours alone exceeds half
of TRL's whole step, 2x TRL is out of reach without making the model itself cheaper.

PPO: TRL 1.x no longer ships a PPO trainer, so TRL's PPOTrainer runs from a second environment with
the last TRL release that has it, in a subprocess (same model files, same prompts, same untrained
reward model; it takes its own process's CPU clock, one step = one rollout batch and its update):

    python -m venv .venv-trl-ppo
    .venv-trl-ppo/bin/pip install torch==2.13.0 trl==0.19.1 transformers==4.53.3 "accelerate<1.9" datasets
    python scripts/bench_rlhf.py --ppo --trl_ppo_python .venv-trl-ppo/bin/python --steps 12 --repeats 2

`--ppo` without `--trl_ppo_python` times our PPO alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


MODEL_CPU = [0.0]  # process CPU seconds spent inside transformers models' forward calls and autograd's backward


@contextlib.contextmanager
def model_clock():
    """Count into MODEL_CPU the CPU time of every outermost forward call of a transformers model (generation's
    decode steps included) and of every backward pass: the model work either trainer cannot do without."""
    from transformers import PreTrainedModel

    depth, call, backward = [0], PreTrainedModel.__call__, torch.autograd.backward
    own = PreTrainedModel.__dict__.get("__call__")  # None: it inherits nn.Module's

    def timed_call(self, *a, **k):
        depth[0] += 1
        begin = time.process_time()
        try:
            return call(self, *a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:  # nested models (the LM inside a CausalLM) count once
                MODEL_CPU[0] += time.process_time() - begin

    def timed_backward(*a, **k):
        begin = time.process_time()
        try:
            return backward(*a, **k)
        finally:
            MODEL_CPU[0] += time.process_time() - begin

    PreTrainedModel.__call__, torch.autograd.backward = timed_call, timed_backward
    try:
        yield
    finally:
        if own is None:
            del PreTrainedModel.__call__
        else:
            PreTrainedModel.__call__ = own
        torch.autograd.backward = backward


# The first and last call of one training step of each stage, patched by name by `cpu_per_step`
# (tests/rlhf/test_bench_rlhf.py checks that they still are what train() calls once per step).
TIMED_CALLS = {"grpo": ("make_batch", "train_step"), "ppo": ("make_batch", "update")}


@contextlib.contextmanager
def cpu_per_step(module, first: str, last: str):
    """Patch `module.first` and `module.last` (the first and last call of a training step) to record the
    process CPU seconds of each step, from the start of `first` to the end of `last`, and how much of it
    was model work (MODEL_CPU); yields the list of (cpu, model_cpu) per step. A run in which they were
    not called as a pair per step (renamed, or no longer called by train()) is an error, not a 0 s step."""
    steps, begin, end, done = [], getattr(module, first), getattr(module, last), [0]

    def timed_begin(*a, **k):
        steps.append((time.process_time(), MODEL_CPU[0]))
        return begin(*a, **k)

    def timed_end(*a, **k):
        result = end(*a, **k)
        steps[-1] = (time.process_time() - steps[-1][0], MODEL_CPU[0] - steps[-1][1])
        done[0] += 1
        return result

    setattr(module, first, timed_begin)
    setattr(module, last, timed_end)
    try:
        with model_clock():
            yield steps
    finally:
        setattr(module, first, begin)
        setattr(module, last, end)
    if not steps or done[0] != len(steps):
        raise RuntimeError(f"{module.__name__}.{first} / {last} timed {done[0]} of {len(steps)} steps: "
                           f"renamed, or no longer called once per step by train()? (TIMED_CALLS)")


def run_ours(args, model_dir: str, out: Path) -> dict:
    from rlhf import grpo
    from rlhf.runtime import make_config, read_jsonl

    cfg = make_config(grpo.Config, dict(
        output_dir=str(out), model_name_or_path=model_dir, max_steps=args.steps, num_generations=args.num_generations,
        per_device_train_batch_size=args.completions, max_completion_length=args.max_completion_length,
        beta=args.beta, loss_type="grpo", learning_rate=1e-5, reward_funcs=["exact_match", "format"],
        num_eval_prompts=0, progress=False, report_to="none", seed=args.seed))
    with cpu_per_step(grpo, *TIMED_CALLS["grpo"]) as steps:  # generation to the end of the update
        grpo.train(cfg)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r][args.warmup:]
    seconds = sum(r["time/step_s"] for r in rows)
    tokens = sum(r["completions/mean_length"] * args.completions for r in rows)
    return {"seconds": seconds, "cpu_seconds": sum(c for c, _ in steps[args.warmup:]),
            "model_cpu_seconds": sum(m for _, m in steps[args.warmup:]), "completions": len(rows) * args.completions,
            "tokens": tokens, "steps": len(rows)}


# TRL's GRPOConfig turns gradient checkpointing on by default (it recomputes the forward pass in the
# backward); ours is off. The headline row runs TRL with it off, as ours; this row shows TRL's defaults.
TRL_DEFAULTS = "TRL, its grad. ckpt on"


def trl_grpo_trainer(model_dir: str, out, prompts: list[str], reward_funcs: list, callbacks=(), **config):
    """TRL's GRPOTrainer on the prompts, CPU, no checkpoints, no evaluation; `config` sets GRPOConfig fields.
    (scripts/bench_grpo_vs_trl.py builds its TRL side with this too.)"""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    base = dict(output_dir=str(out), logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                       processing_class=AutoTokenizer.from_pretrained(model_dir), reward_funcs=reward_funcs,
                       args=GRPOConfig(**{**base, **config}), train_dataset=Dataset.from_dict({"prompt": prompts}),
                       callbacks=list(callbacks))


def run_trl(args, model_dir: str, out: Path, gradient_checkpointing: bool = False) -> dict:
    from transformers import TrainerCallback

    from rlhf.tasks.arithmetic import exact_match_reward, format_reward, make_prompts

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.durations, self.cpu, self.model_cpu = None, [], [], []

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter(), time.process_time(), MODEL_CPU[0]

        def on_step_end(self, *a, **k):
            self.durations.append(time.perf_counter() - self.begin[0])
            self.cpu.append(time.process_time() - self.begin[1])
            self.model_cpu.append(MODEL_CPU[0] - self.begin[2])

    timer = StepTimer()
    n_prompts = args.steps * args.completions // args.num_generations
    trainer = trl_grpo_trainer(model_dir, out, make_prompts(n_prompts * 2, args.seed),
                               [exact_match_reward, format_reward], [timer], max_steps=args.steps,
                               per_device_train_batch_size=args.completions, num_generations=args.num_generations,
                               max_completion_length=args.max_completion_length, beta=args.beta, loss_type="grpo",
                               learning_rate=1e-5, seed=args.seed, gradient_checkpointing=gradient_checkpointing)
    with model_clock():
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    durations, lengths = timer.durations[args.warmup:], lengths[args.warmup:]
    return {"seconds": sum(durations), "cpu_seconds": sum(timer.cpu[args.warmup:]),
            "model_cpu_seconds": sum(timer.model_cpu[args.warmup:]), "completions": len(durations) * args.completions,
            "tokens": sum(length * args.completions for length in lengths), "steps": len(durations)}


# --- PPO -------------------------------------------------------------------------------------------
# Matched settings (TRL's PPOTrainer defaults where ours has the same option): 64 completions per step,
# 4 mini-batches of 16, 4 PPO epochs, max 8 new tokens, temperature 1, k1 KL penalty with beta 0.05,
# clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, AdamW 1e-5, rollouts scored in forward
# passes of 64 (TRL's local_rollout_forward_batch_size, our rollout_batch_size); the same untrained reward
# model scores both, and both value models start from it; a separate frozen reference on both sides.
PPO_BATCH, PPO_MINI_BATCHES, PPO_EPOCHS = 64, 4, 4


def run_ppo(args, model_dir: str, rm_dir: str, out: Path) -> dict:
    from rlhf import ppo
    from rlhf.runtime import make_config, read_jsonl

    cfg = make_config(ppo.Config, dict(
        output_dir=str(out), model_name_or_path=model_dir, reward_model_path=rm_dir, max_steps=args.steps,
        per_device_train_batch_size=PPO_BATCH // PPO_MINI_BATCHES, num_mini_batches=PPO_MINI_BATCHES,
        num_ppo_epochs=PPO_EPOCHS, rollout_batch_size=PPO_BATCH, max_completion_length=args.max_completion_length,
        learning_rate=1e-5, kl_coef=0.05, num_eval_prompts=0, progress=False, report_to="none", seed=args.seed))
    with cpu_per_step(ppo, *TIMED_CALLS["ppo"]) as steps:  # generation to the end of the update
        ppo.train(cfg)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r][args.warmup:]
    return {"seconds": sum(r["time/step_s"] for r in rows), "cpu_seconds": sum(c for c, _ in steps[args.warmup:]),
            "model_cpu_seconds": sum(m for _, m in steps[args.warmup:]),
            "completions": len(rows) * PPO_BATCH, "tokens": sum(r["completions/mean_length"] * PPO_BATCH for r in rows),
            "steps": len(rows)}


# Runs under `--trl_ppo_python`: an interpreter whose environment has a TRL that still ships PPOTrainer.
TRL_PPO = """
import json, sys, time, torch
s = json.loads(sys.argv[1])
torch.set_num_threads(s["threads"])
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                          TrainerCallback)
from trl import PPOConfig, PPOTrainer
# the tiny model's tokenizer was saved by transformers 5; build the same fast tokenizer from its files
special = {k: v for k, v in json.load(open(s["model_dir"] + "/tokenizer_config.json")).items() if k.endswith("_token")}
tok = PreTrainedTokenizerFast(tokenizer_file=s["model_dir"] + "/tokenizer.json", padding_side="left", **special)
dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in s["prompts"]]})
class Marks(TrainerCallback):
    def __init__(self):
        self.marks = []
    def on_train_begin(self, *a, **k):
        self.marks.append((time.perf_counter(), time.process_time()))
    def on_step_end(self, *a, **k):
        self.marks.append((time.perf_counter(), time.process_time()))
marks = Marks()
config = PPOConfig(output_dir=s["out"], per_device_train_batch_size=s["batch"], num_mini_batches=s["mini_batches"],
                   local_rollout_forward_batch_size=s["batch"],
                   num_ppo_epochs=s["epochs"], total_episodes=s["steps"] * s["batch"], response_length=s["max_new"],
                   temperature=1.0, kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                   gamma=1.0, lam=0.95, learning_rate=1e-5, stop_token="eos", num_sample_generations=0,
                   report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=s["seed"], logging_steps=1,
                   disable_tqdm=True)
trainer = PPOTrainer(args=config, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(s["model_dir"]),
                     ref_model=AutoModelForCausalLM.from_pretrained(s["model_dir"]),
                     reward_model=AutoModelForSequenceClassification.from_pretrained(s["rm_dir"]),
                     value_model=AutoModelForSequenceClassification.from_pretrained(s["rm_dir"]),
                     train_dataset=dataset, eval_dataset=dataset.select(range(s["batch"])), callbacks=[marks])
trainer.train()
w, m = s["warmup"], marks.marks
print(json.dumps({"seconds": m[-1][0] - m[w][0], "cpu_seconds": m[-1][1] - m[w][1],
                  "completions": (len(m) - 1 - w) * s["batch"], "steps": len(m) - 1 - w}))
"""


def run_trl_ppo(args, model_dir: str, rm_dir: str, out: Path) -> dict:
    import subprocess

    from rlhf.tasks.arithmetic import make_prompts

    settings = dict(model_dir=model_dir, rm_dir=rm_dir, out=str(out), batch=PPO_BATCH, mini_batches=PPO_MINI_BATCHES,
                    epochs=PPO_EPOCHS, steps=args.steps, warmup=args.warmup, max_new=args.max_completion_length,
                    threads=args.threads, seed=args.seed, prompts=make_prompts(args.steps * PPO_BATCH * 2, args.seed))
    proc = subprocess.run([args.trl_ppo_python, "-c", TRL_PPO, json.dumps(settings)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL PPOTrainer under {args.trl_ppo_python} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="", help="A causal LM directory (default: builtin:tiny saved to a temp "
                                                        "dir).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--completions", type=int, default=64, help="Completions per optimizer step.")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ppo", action="store_true", help="Also time our PPO (against TRL's PPOTrainer with "
                                                           "--trl_ppo_python).")
    parser.add_argument("--trl_ppo_python", default="", help="A Python whose environment has a TRL with PPOTrainer "
                                                             "(TRL <= 0.19; see the docstring) to compare our PPO "
                                                             "with.")
    parser.add_argument("--json", default="", help="Also write the results to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        if not model_dir:
            from rlhf.models import save_builtin_tiny

            model_dir = str(save_builtin_tiny(tmp / "tiny"))
        runners = {"ours (rlhf grpo)": run_ours, "TRL GRPOTrainer": run_trl,
                   TRL_DEFAULTS: lambda a, m, o: run_trl(a, m, o, gradient_checkpointing=True)}
        if args.ppo:
            from rlhf.models import BUILTIN_TINY, load_reward_model, load_tokenizer

            torch.manual_seed(args.seed)  # the reward model's new score head
            rm_dir = str(tmp / "rm")
            load_reward_model(BUILTIN_TINY).save_pretrained(rm_dir)
            load_tokenizer(BUILTIN_TINY).save_pretrained(rm_dir)
            runners["ours (rlhf ppo)"] = lambda a, m, o: run_ppo(a, m, rm_dir, o)
            if args.trl_ppo_python:
                runners["TRL PPOTrainer"] = lambda a, m, o: run_trl_ppo(a, m, rm_dir, o)
        results = {name: [] for name in runners}
        for r in range(args.repeats):
            for i, (name, fn) in enumerate(runners.items()):
                results[name].append(fn(args, model_dir, tmp / f"run{i}_{r}"))

    def median_rate(runs, key, per="seconds"):
        return (
            statistics.median(run[key] / run[per] for run in runs)
            if all(key in run and per in run for run in runs)
            else float("nan")
        )

    print(f"\nGRPO throughput: {args.completions} completions/step (G={args.num_generations}), "
          f"max_completion_length={args.max_completion_length}, beta={args.beta}, {args.threads} thread(s), "
          f"{args.steps - args.warmup} timed steps x {args.repeats} repeats (median)\n")
    header = (f"| {'trainer':<26} | {'completions/s':>13} | {'tokens/s':>9} | {'s/step':>7} "
              f"| {'completions/CPU-s':>17} | {'tokens/CPU-s':>12} | {'CPU ms/step':>11} | {'in model calls':>14} |")
    rule = "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"
    table = {}
    for name, runs in results.items():
        per_step = PPO_BATCH if "ppo" in name.lower() else args.completions
        cps, tps = median_rate(runs, "completions"), median_rate(runs, "tokens")
        cpu_cps, cpu_tps = median_rate(runs, "completions", "cpu_seconds"), median_rate(runs, "tokens", "cpu_seconds")
        # CPU time per step, and the part of it inside the models' forward calls and backward passes
        cpu_ms = 1000 * median_rate(runs, "cpu_seconds", "steps")
        model_ms = 1000 * median_rate(runs, "model_cpu_seconds", "steps")
        table[name] = {"completions_per_s": cps, "tokens_per_s": tps, "s_per_step": per_step / cps,
                       "completions_per_cpu_s": cpu_cps, "tokens_per_cpu_s": cpu_tps, "cpu_ms_per_step": cpu_ms,
                       "model_cpu_ms_per_step": model_ms}
        if name == "ours (rlhf ppo)":
            print(f"\nPPO throughput: {PPO_BATCH} completions/step in {PPO_MINI_BATCHES} mini-batches, {PPO_EPOCHS} "
                  f"epochs, "
                  f"same reward model and settings (see PPO_BATCH in the script); TRL reports no token counts\n")
        if name in ("ours (rlhf grpo)", "ours (rlhf ppo)"):
            print(header + "\n" + rule)
        print(f"| {name:<26} | {cps:>13.1f} | {tps:>9.1f} | {per_step / cps:>7.3f} "
              f"| {cpu_cps:>17.1f} | {cpu_tps:>12.1f} | {cpu_ms:>11.1f} | {model_ms:>14.1f} |")
        if name == TRL_DEFAULTS:
            ours = table["ours (rlhf grpo)"]
            trl_ms, trl_model_ms = (table["TRL GRPOTrainer"]["cpu_ms_per_step"],
                                    table["TRL GRPOTrainer"]["model_cpu_ms_per_step"])
            for label, trl in (("TRL", table["TRL GRPOTrainer"]), ("TRL with its default checkpointing", table[name])):
                print(
                    f"\nratio ours / {label}: completions/s "
                    f"x{ours['completions_per_s'] / trl['completions_per_s']:.2f} (wall), "
                    f"x{ours['completions_per_cpu_s'] / trl['completions_per_cpu_s']:.2f} (CPU: robust on a "
                    f"shared machine); tokens/s x{ours['tokens_per_s'] / trl['tokens_per_s']:.2f} (wall)",
                    end="",
                )
            print(f"\n2x TRL would take <= {trl_ms / 2:.1f} CPU ms per step; ours spends "
                  f"{ours['model_cpu_ms_per_step']:.1f} "
                  f"of its {ours['cpu_ms_per_step']:.1f} in model calls alone (TRL {trl_model_ms:.1f} of {trl_ms:.1f})")
        if name == "TRL PPOTrainer":
            ours, trl = table["ours (rlhf ppo)"], table["TRL PPOTrainer"]
            print(f"\nratio ours / TRL PPO: completions/s x{ours['completions_per_s'] / trl['completions_per_s']:.2f} "
                  f"(wall), "
                  f"x{ours['completions_per_cpu_s'] / trl['completions_per_cpu_s']:.2f} (CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": table, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
