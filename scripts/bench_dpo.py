"""DPO side by side: `rlhf dpo` vs TRL's DPOTrainer on the same SFT model, the same pairs and settings.

The pairs are those of a rankings file (every (better, worse) pair of each prompt, ties skipped, as
`rlhf dpo` trains on rankings), shuffled once and cut to steps x batch_size, so both make one pass
over the same pairs: sigmoid loss, the same beta, AdamW with the same learning rate (constant after a
5% warmup), batch size, gradient clipping, max_length, fp32, no gradient checkpointing, dropout off,
one torch thread each; the reference computed per batch from a frozen copy (TRL's default) and, in two
more rows, once before training (`precompute_ref_log_probs`, ours' default). Ours runs with its defaults
otherwise (`share_prompt_prefix`: a pair's prompt goes through the model once for both responses; TRL
forwards prompt + chosen and prompt + rejected). TRL runs in its own
virtualenv (`--trl_python`), given only the model directory and a JSONL file of pairs, each run with an empty
datasets cache (TRL caches its tokenised pairs and precomputed reference log-probs there; a warm cache would skip
them).

`--repeats N` runs every trainer N times, round-robin, and reports the median CPU time (and its range, and the
range of the ratios); `--setups random` or `--setups rankings` runs one of the two comparisons.

Reported: optimizer steps, pairs per CPU-second of the training call from the data on (ours: the whole
`rlhf dpo` train call, reading, tokenising and saving included; TRL: from reading the pairs through
`DPOTrainer(...)` and `trainer.train()`), the training loop's wall time, and for each trained model,
scored here with the same code: held-out preference accuracy (pairs of held-out gold-ranked rankings ordered by the
implicit reward log pi - log pi_sft) and greedy accuracy on 500 held-out arithmetic prompts.

    python3 -m venv /work/trl-env && /work/trl-env/bin/pip install torch==2.13.0 trl   # a CPU torch
    python scripts/bench_dpo.py --sft_model SFT/model --rankings OUT/rankings.jsonl \
        --eval_rankings OUT/rankings_eval.jsonl --trl_python /work/trl-env/bin/python --steps 300

`--analysis` (no TRL needed) prints instead what bounds the pairs' throughput: token positions per pair in TRL's
layout, in ours, and in the best rectangular packing of whole prompt + responses segments into shared rows; and the
CPU time of one policy forward + backward on a batch of the pairs, eager against torch.compile and float32 against
bf16 autocast.

`--train_seeds 1,2,3` (instead) trains both once per seed on the same pairs, reference per batch, each seed ordering
the pairs and seeding the trainer, and prints each one's held-out preference accuracy, their means and the paired
difference: the spread a single comparison carries from the order of its pairs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ranking_pairs(row: dict) -> list[dict]:
    """Every (better, worse) pair of one ranking, ties skipped, as prompt / chosen / rejected rows."""
    c, r = row["completions"], row["ranks"]
    return [{"prompt": row["prompt"], "chosen": c[i], "rejected": c[j]}
            for i in range(len(c)) for j in range(len(c)) if r[i] < r[j]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(args, tmp: Path) -> dict:
    """pairs: a random sample of steps x batch_size pairs of all rankings; grouped: the first rankings (in a random
    order) holding steps x group_batch_size prompts, as rankings (ours) and as their pairs, shuffled (TRL)."""
    import numpy as np

    rows = [json.loads(line) for line in open(args.rankings) if line.strip()]
    rng = np.random.default_rng(args.seed)
    pairs = [p for row in rows for p in ranking_pairs(row)]
    sample = [pairs[i] for i in rng.permutation(len(pairs))[:args.steps * args.batch_size]]
    groups = [rows[i] for i in rng.permutation(len(rows))[:args.steps * args.group_batch_size]]
    grouped = [p for row in groups for p in ranking_pairs(row)]
    grouped = [grouped[i] for i in rng.permutation(len(grouped))]
    per_prompt = len(grouped) // len(groups)
    if not all(len(ranking_pairs(r)) == per_prompt for r in groups):
        raise SystemExit("the grouped comparison needs the same number of pairs per ranking (no ties)")
    return {"pairs": write_jsonl(tmp / "pairs.jsonl", sample), "n_pairs": len(sample),
            "rankings": write_jsonl(tmp / "rankings.jsonl", groups), "grouped_pairs": write_jsonl(
                tmp / "grouped_pairs.jsonl", grouped), "n_grouped": len(grouped), "per_prompt": per_prompt}


def ffd_rows(sizes: list[int], capacity: int) -> list[int]:
    """Fill of each row when segments of `sizes` are packed first-fit decreasing into rows of `capacity`."""
    rows: list[int] = []
    for size in sorted(sizes, reverse=True):
        fit = next((i for i, fill in enumerate(rows) if fill + size <= capacity), None)
        if fit is None:
            rows.append(size)
        else:
            rows[fit] += size
    return rows


def analysis(args, pairs: Path) -> None:
    """Token positions per pair for each layout, and the CPU cost of the model call at this batch's shapes."""
    import statistics

    import torch

    from rlhf import dpo
    from rlhf.data import load_rows, tokenize_rankings
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.models.attention import PADDED_SDPA, use_padded_sdpa
    from rlhf.models.linear import OneDNNLinear, onednn_linear, use_onednn_linear

    tokenizer = load_tokenizer(args.sft_model)
    groups = tokenize_rankings(load_rows(str(pairs)), tokenizer, 64, str(pairs)).examples
    bs = args.batch_size
    batches = [groups[i:i + bs] for i in range(0, len(groups) - bs + 1, bs)]
    layouts = {"TRL (prompt + chosen, prompt + rejected, each row padded)": 0, "ours (prompt once, both responses "
               "after it, each without its last token)": 0, "best packing (whole segments, rows of 2x the longest, "
               "padded)": 0, "no padding": 0}
    names = list(layouts)
    for batch in batches:
        full = [len(seq) for g in batch for seq in g["input_ids"]]  # prompt + response, each
        prompt = [g["prompt_len"] for g in batch]
        response = [len(seq) - g["prompt_len"] for g in batch for seq in g["input_ids"]]
        # a response's last token is no model input in our layout (it predicts nothing), nor in these two
        segment = [g["prompt_len"] + sum(len(seq) - g["prompt_len"] - 1 for seq in g["input_ids"]) for g in batch]
        rows = ffd_rows(segment, 2 * max(segment))
        for name, positions in zip(names, (len(full) * max(full), len(batch) * (max(prompt) + 2 * (max(response) - 1)),
                                           len(rows) * max(rows), sum(segment))):
            layouts[name] += positions / (len(batches) * bs)
    print(f"\nToken positions per pair ({len(batches)} batches of {bs} pairs from {pairs.name}):\n")
    print("| layout | positions per pair |\n|---|---|")
    for name, value in layouts.items():
        print(f"| {name} | {value:.1f} |")

    model = use_onednn_linear(use_padded_sdpa(load_causal_lm(args.sft_model)))  # as `rlhf dpo` runs it
    batch = dpo.collate(batches[0], tokenizer.pad_token_id)

    def step(m, bf16: bool = False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps = dpo.response_logps(m, batch, share_prompt_prefix=True)
        logps.sum().backward()

    def cpu_ms(fn, n: int = 50) -> float:
        times = []
        for _ in range(n):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return 1000 * statistics.median(times)

    def reference():
        with torch.inference_mode():
            dpo.response_logps(model, batch, share_prompt_prefix=True)

    step(model)
    rows = [("reference forward only (no gradient), eager, float32", cpu_ms(reference)),
            ("eager, float32", cpu_ms(lambda: step(model))),
            ("eager, bf16 autocast", cpu_ms(lambda: step(model, True)))]
    model.set_attn_implementation("sdpa")  # transformers' own, keys not padded (rlhf.models.attention)
    rows += [("reference forward, transformers' SDPA (keys not padded to 16)", cpu_ms(reference)),
             ("eager, float32, transformers' SDPA (keys not padded to 16)", cpu_ms(lambda: step(model)))]
    model.set_attn_implementation(PADDED_SDPA)
    linears = [m for m in model.modules() if type(m) is OneDNNLinear]
    for m in linears:  # torch's own float32 linear: MKL's sgemm (rlhf.models.linear)
        m.__class__ = torch.nn.Linear
    rows += [("reference forward, MKL's linear (torch's default)", cpu_ms(reference)),
             ("eager, float32, MKL's linear (torch's default)", cpu_ms(lambda: step(model)))]
    for m in linears:
        m.__class__ = OneDNNLinear
    compiled = torch.compile(model)
    t = time.process_time()
    step(compiled)
    first = time.process_time() - t
    rows.append((f"torch.compile, float32 (first call: {first:.1f} CPU s)", cpu_ms(lambda: step(compiled))))
    print(f"\nPolicy forward + backward (and the reference forward) of one batch ({bs} pairs, "
          f"{tuple(batch['prompt_ids'].shape)} prompts, "
          f"{tuple(batch['completion_ids'].shape)} responses), median of 50, 1 thread:\n")
    print("| path | CPU-ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")

    (u, p), r = batch["prompt_ids"].shape, batch["completion_ids"].shape[1]
    n, width, mlp = u * (p + 2 * (r - 1)), model.config.hidden_size, model.config.intermediate_size
    print(f"\nThe model's linear layers at this batch ({n} token positions), median of 200, 1 thread:\n")
    print("| x (M, K) @ W.T (K, N) | MKL (torch's default) us | oneDNN (rlhf.models.linear) us |\n|---|---|---|")
    for k, out in ((width, mlp), (mlp, width), (width, width)):
        x, w = torch.randn(n, k), torch.randn(out, k)
        mkl, onednn = cpu_ms(lambda: torch.nn.functional.linear(x, w), 200), cpu_ms(lambda: onednn_linear(x, w), 200)
        print(f"| ({n}, {k}) x ({k}, {out}) | {1000 * mkl:.0f} | {1000 * onednn:.0f} |")


def run_ours(args, data: Path, out: Path, precompute: bool, batch_size: int) -> dict:
    from rlhf import dpo
    from rlhf.runtime import make_config

    cfg = make_config(dpo.Config, dict(
        output_dir=str(out), model_name_or_path=args.sft_model, dataset_name=str(data), max_steps=args.steps,
        num_train_epochs=1.0, per_device_train_batch_size=batch_size, learning_rate=args.learning_rate,
        beta=args.beta, loss_type="sigmoid", lr_scheduler_type="constant_with_warmup", warmup_ratio=0.05,
        max_grad_norm=1.0, max_length=64, precompute_ref_log_probs=precompute, num_eval_prompts=0,
        num_greedy_eval_prompts=0, seed=args.seed, progress=False, report_to="none", overwrite=True,
        logging_steps=args.steps))
    cpu = time.process_time()
    summary = dpo.train(cfg)
    return {"cpu_s": time.process_time() - cpu, "loop_s": summary["time/train_s"], "model": str(out / "model"),
            "steps": summary["step"]}


def trl_worker(args) -> None:
    """In TRL's virtualenv: train with DPOTrainer, print {"cpu_s", "loop_s", "model", "steps"} as JSON."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model)
    model = AutoModelForCausalLM.from_pretrained(args.sft_model, dtype=torch.float32)
    config = DPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.learning_rate, beta=args.beta, loss_type=["sigmoid"],
                       lr_scheduler_type="constant_with_warmup", warmup_steps=int(0.05 * args.steps),
                       max_grad_norm=1.0, max_length=64, precompute_ref_log_probs=args.precompute,
                       gradient_checkpointing=False, bf16=False, fp16=False,
                       use_cpu=True, seed=args.seed, report_to="none", save_strategy="no", logging_steps=args.steps,
                       disable_tqdm=True, dataloader_num_workers=0, disable_dropout=True)
    cpu = time.process_time()  # from the data on, as for ours: tokenising (and TRL's reference pass) counts
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.load_dataset("json", data_files=args.pairs, split="train"))
    result = trainer.train()
    cpu = time.process_time() - cpu
    trainer.save_model(str(Path(args.out) / "model"))
    tokenizer.save_pretrained(str(Path(args.out) / "model"))
    print(json.dumps({"cpu_s": cpu, "loop_s": result.metrics["train_runtime"], "model": str(Path(args.out) / "model"),
                      "steps": trainer.state.global_step}))


def run_trl(args, pairs: Path, out: Path, precompute: bool, batch_size: int) -> dict:
    cmd = [args.trl_python, __file__, "--trl_worker", "--sft_model", args.sft_model, "--pairs", str(pairs),
           "--precompute", str(precompute),
           "--out", str(out), "--steps", str(args.steps), "--batch_size", str(batch_size),
           "--learning_rate", str(args.learning_rate), "--beta", str(args.beta), "--seed", str(args.seed)]
    # a fresh datasets cache for every run: DPOTrainer caches its tokenised data set and its precomputed reference
    # log-probs there (keyed by data and model), so a later run on the same pairs would skip both
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="hf_datasets_", dir=out.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def score(model_dir: str, args) -> dict:
    """Held-out preference accuracy (implicit reward vs the SFT model) and greedy accuracy, the same code for both."""
    import torch

    from rlhf import dpo
    from rlhf.core import ranked_pairs
    from rlhf.data import load_rows, tokenize_rankings
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.tasks import arithmetic

    tokenizer = load_tokenizer(args.sft_model)
    groups = tokenize_rankings(load_rows(args.eval_rankings), tokenizer, 64, args.eval_rankings).examples
    policy, reference = load_causal_lm(model_dir).eval(), load_causal_lm(args.sft_model).eval()
    correct = total = 0.0
    with torch.no_grad():
        for i in range(0, len(groups), 64):
            batch = dpo.collate(groups[i:i + 64], tokenizer.pad_token_id)
            rewards = (dpo.response_logps(policy, batch, share_prompt_prefix=True)
                       - dpo.response_logps(reference, batch, share_prompt_prefix=True))
            pairs = ranked_pairs(batch["ranks"]).float()
            correct += float(((rewards.unsqueeze(2) - rewards.unsqueeze(1) > 0).float() * pairs).sum())
            total += float(pairs.sum())
        greedy = arithmetic.evaluate_policy(policy, tokenizer, arithmetic.make_prompts(500, 1, split="eval"), 128)
    return {"preference_accuracy": correct / total, "accuracy": greedy["eval/accuracy"]}


def order_spread(args, pairs: Path, tmp: Path) -> None:
    """Held-out preference accuracy of both trainers on the same pairs, once per training seed (the pairs' order,
    the trainer's randomness): how much of a single comparison is the luck of the order."""
    import copy

    rows = []
    for seed in args.train_seeds:
        a = copy.copy(args)
        a.seed = seed
        trl = score(run_trl(a, pairs, tmp / f"t{seed}", False, args.batch_size)["model"], args)
        ours = score(run_ours(a, pairs, tmp / f"o{seed}", False, args.batch_size)["model"], args)
        rows.append((seed, trl["preference_accuracy"], ours["preference_accuracy"]))
    print(f"\nHeld-out preference accuracy after {args.steps} steps of {args.batch_size} pairs (reference per batch), "
          f"the same {args.steps * args.batch_size} pairs (--seed {args.seed}) in each seed's order:\n")
    print("| training seed | TRL DPOTrainer | rlhf dpo | ours - TRL (points) |\n|---|---|---|---|")
    for seed, t, o in rows:
        print(f"| {seed} | {100 * t:.1f}% | {100 * o:.1f}% | {100 * (o - t):+.1f} |")
    trl, ours = [r[1] for r in rows], [r[2] for r in rows]
    diff = [100 * (o - t) for t, o in zip(trl, ours)]

    def sd(xs):  # the sample standard deviation
        return statistics.stdev(xs) if len(xs) > 1 else float("nan")

    print(f"| mean (sd) | {100 * statistics.mean(trl):.1f}% ({100 * sd(trl):.1f}) | "
          f"{100 * statistics.mean(ours):.1f}% ({100 * sd(ours):.1f}) | "
          f"{statistics.mean(diff):+.1f} (standard error {sd(diff) / len(diff) ** 0.5:.1f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft_model", required=True)
    p.add_argument("--rankings", help="K-wise rankings (prompt, completions, ranks) whose pairs both train on.")
    p.add_argument("--eval_rankings", help="Held-out gold-ranked rankings for the preference accuracy.")
    p.add_argument("--trl_python", default="/work/trl-env/bin/python", help="Python of a virtualenv with trl.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32, help="Pairs per step (random pairs).")
    p.add_argument("--group_batch_size", type=int, default=4, help="Rankings per step (grouped pairs).")
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1,
                   help="Run every trainer this many times, round-robin; CPU s is the median (and range).")
    p.add_argument("--setups", default="random,rankings", type=lambda v: v.split(","),
                   help="Which comparisons: random (random pairs of the rankings), rankings (the pairs of whole "
                        "rankings), or both.")
    p.add_argument("--analysis", action="store_true", help="Print the layout and model-call analysis instead.")
    p.add_argument("--train_seeds", type=lambda v: [int(x) for x in v.split(",")],
                   help="Instead: train both (reference per batch) once per seed on the same random pairs (those of "
                        "--seed): each seed orders the pairs and seeds the trainer; print held-out accuracies.")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--precompute", type=lambda v: v == "True", default=False, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import gc

    import torch

    import rlhf.dpo  # noqa: F401

    torch.set_num_threads(1)
    gc.freeze()  # as the `rlhf` command does once it has imported its stage (rlhf.cli)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(args, tmp)
        if args.analysis:
            return analysis(args, data["pairs"])
        if args.train_seeds:
            return order_spread(args, data["pairs"], tmp)
        gb, pairs_per_step = args.group_batch_size, args.group_batch_size * data["per_prompt"]
        setups = [
            ("random", f"{data['n_pairs']} random pairs of the rankings, {args.batch_size} pairs per step",
             data["n_pairs"], [
                ("TRL DPOTrainer", lambda: run_trl(args, data["pairs"], tmp / "t1", False, args.batch_size)),
                ("rlhf dpo", lambda: run_ours(args, data["pairs"], tmp / "o1", False, args.batch_size)),
                ("TRL DPOTrainer, precompute_ref_log_probs",
                 lambda: run_trl(args, data["pairs"], tmp / "t2", True, args.batch_size)),
                ("rlhf dpo, precompute_ref_log_probs",
                 lambda: run_ours(args, data["pairs"], tmp / "o2", True, args.batch_size))]),
            ("rankings", f"the {data['n_grouped']} pairs of {args.steps * gb} whole rankings, {pairs_per_step} pairs "
             f"per step (TRL: pairs; ours: the rankings, {gb} prompts x {data['per_prompt']} pairs, each response "
             "forwarded once)", data["n_grouped"], [
                ("TRL DPOTrainer", lambda: run_trl(args, data["grouped_pairs"], tmp / "t3", False, pairs_per_step)),
                ("rlhf dpo", lambda: run_ours(args, data["rankings"], tmp / "o3", False, gb)),
                ("TRL DPOTrainer, precompute_ref_log_probs",
                 lambda: run_trl(args, data["grouped_pairs"], tmp / "t4", True, pairs_per_step)),
                ("rlhf dpo, precompute_ref_log_probs",
                 lambda: run_ours(args, data["rankings"], tmp / "o4", True, gb))]),
        ]
        for key, title, n, runs in setups:
            if key not in args.setups:
                continue
            cpu_s, last = {name: [] for name, _ in runs}, {}
            for _ in range(args.repeats):  # round-robin: a slow spell of the shared machine hits every trainer
                for name, fn in runs:
                    last[name] = fn()
                    cpu_s[name].append(last[name]["cpu_s"])
            tables.append((title, n, [(name, last[name], cpu_s[name], score(last[name]["model"], args))
                                      for name, _ in runs]))
    base = score(args.sft_model, args)
    print(f"\nDPO (sigmoid, beta {args.beta}, lr {args.learning_rate}, constant after 5% warmup) from "
          f"{args.sft_model}, {args.steps} steps, 1 torch thread each; the SFT model's greedy accuracy "
          f"{base['accuracy']:.3f}" + (f"; CPU s: median (min-max) of {args.repeats} runs" if args.repeats > 1 else ""))
    for title, n, rows in tables:
        print(f"\n{title}\n")
        print("| trainer | steps | CPU s | loop s | pairs / CPU-s | held-out preference acc. | greedy acc. |")
        print("|---|---|---|---|---|---|---|")
        for name, r, cpus, s in rows:
            spread = f" ({min(cpus):.1f}-{max(cpus):.1f})" if len(cpus) > 1 else ""
            print(f"| {name} | {r['steps']} | {statistics.median(cpus):.1f}{spread} | {r['loop_s']:.1f} | "
                  f"{n / statistics.median(cpus):.0f} | {s['preference_accuracy']:.3f} | {s['accuracy']:.3f} |")
        med = [statistics.median(cpus) for _, _, cpus, _ in rows]
        each = [[a / b for a, b in zip(rows[i][2], rows[j][2])] for i, j in ((0, 1), (2, 3), (0, 3))]
        spreads = [f" ({min(e):.2f}-{max(e):.2f})" if len(e) > 1 else "" for e in each]
        print(f"\nthroughput rlhf dpo / TRL: {med[0] / med[1]:.2f}{spreads[0]} (reference per batch, both), "
              f"{med[2] / med[3]:.2f}{spreads[1]} (precomputed, both), {med[0] / med[3]:.2f}{spreads[2]} (each one's "
              "default: TRL per batch, ours precomputed)")

if __name__ == "__main__":
    sys.exit(main())
