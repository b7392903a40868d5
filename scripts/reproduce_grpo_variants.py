"""Every GRPO variant of `rlhf grpo` on the built-in arithmetic task, from the pipeline's SFT model.

Each row is `configs/rlhf/grpo_tiny.yaml` (exact-match + 0.1 format reward) at the budget in BUDGET (200
steps of 8 prompts x G = 8, constant 1e-4) with the variant's options on top, so every variant has the
same budget of optimizer steps and prompts. Columns: greedy held-out accuracy on the stage's 500
held-out prompts, split into prompts whose sum needs a carry and those that do not
(eval/accuracy_carry, eval/accuracy_no_carry), per seed, and the stage's training time.

    python scripts/reproduce_grpo_variants.py --sft_model runs/demo/sft/model      # 19 rows x 3 seeds
    python scripts/reproduce_grpo_variants.py                                       # trains the SFT model first
    python scripts/reproduce_grpo_variants.py --variants grpo,rloo --seeds 1       # a subset
Runs whose summary.json exists are reused, so an interrupted reproduction continues where it stopped.
Writes the table to --out (markdown) and a plot next to it (.png).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRPO_CONFIG = ROOT / "configs/rlhf/grpo_tiny.yaml"

# The budget every row shares: grpo_tiny.yaml's reward functions, lengths and beta, with 200 steps of 8 prompts x
# G = 8 at a constant 1e-4 (the shipped config trains 1200 steps of 16 x 4 at a decaying 2e-4; see its comments).
BUDGET = ["--num_generations", "8", "--per_device_train_batch_size", "64", "--learning_rate", "1e-4",
          "--lr_scheduler_type", "constant", "--max_steps", "200", "--eval_steps", "50", "--save_steps", "50"]

# (name, label, command-line overrides of grpo_tiny.yaml on top of BUDGET)
VARIANTS = [
    ("grpo", "GRPO (grpo_tiny.yaml's options at this budget)", []),
    ("dapo_loss", "loss_type dapo", ["--loss_type", "dapo"]),
    ("dr_grpo", "Dr. GRPO (loss dr_grpo, scale_rewards none)", ["--loss_type", "dr_grpo", "--scale_rewards", "none"]),
    ("grpo_mu2", "GRPO, num_iterations 2", ["--num_iterations", "2"]),
    ("gspo_mu2", "GSPO (sequence ratio), num_iterations 2", ["--importance_sampling_level", "sequence",
                                                            "--num_iterations", "2"]),
    ("rloo", "RLOO advantages", ["--advantage_estimator", "rloo"]),
    ("reinforce_pp", "REINFORCE++ (k1 in the reward)", ["--advantage_estimator", "reinforce_pp",
                                                        "--kl_in_reward", "true"]),
    ("remax", "ReMax (greedy baseline)", ["--advantage_estimator", "remax"]),
    ("k1_in_reward", "k1 in the reward", ["--kl_in_reward", "true"]),
    ("entropy", "entropy bonus 0.01", ["--entropy_coef", "0.01"]),
    ("dynamic_sampling", "DAPO dynamic sampling", ["--dynamic_sampling", "true"]),
    ("dapo", "DAPO (dynamic sampling, dapo loss, clip-higher 0.28, overlong 2, beta 0)",
     ["--dynamic_sampling", "true", "--loss_type", "dapo", "--cliprange_high", "0.28", "--overlong_buffer_len", "2",
      "--beta", "0"]),
    # ablations of the DAPO recipe, and combinations with it
    ("clip_higher", "clip-higher 0.28 alone", ["--cliprange_high", "0.28"]),
    ("beta0", "beta 0 alone (no KL term, no reference model)", ["--beta", "0"]),
    ("dapo_beta", "DAPO, keeping beta 0.02", ["--dynamic_sampling", "true", "--loss_type", "dapo",
                                               "--cliprange_high", "0.28", "--overlong_buffer_len", "2"]),
    ("dapo_rloo", "DAPO + RLOO advantages", ["--dynamic_sampling", "true", "--loss_type", "dapo",
                                             "--cliprange_high", "0.28", "--overlong_buffer_len", "2", "--beta", "0",
                                             "--advantage_estimator", "rloo"]),
    ("dapo_dr", "DAPO with Dr. GRPO's loss and unscaled advantages",
     ["--dynamic_sampling", "true", "--loss_type", "dr_grpo", "--scale_rewards", "none", "--cliprange_high", "0.28",
      "--overlong_buffer_len", "2", "--beta", "0"]),
    ("dapo_rloo_dr", "DAPO + RLOO with Dr. GRPO's loss",
     ["--dynamic_sampling", "true", "--loss_type", "dr_grpo", "--cliprange_high", "0.28", "--overlong_buffer_len", "2",
      "--beta", "0", "--advantage_estimator", "rloo"]),
    ("dapo_8rounds", "DAPO, max_sampling_rounds 8", ["--dynamic_sampling", "true", "--loss_type", "dapo",
                                                     "--cliprange_high", "0.28", "--overlong_buffer_len", "2",
                                                     "--beta", "0", "--max_sampling_rounds", "8"]),
]
KEYS = ("eval/accuracy", "eval/accuracy_carry", "eval/accuracy_no_carry", "time/train_s")


def train_sft(runs_dir: Path) -> Path:
    """The pipeline's SFT stage (configs/rlhf/sft_tiny.yaml) when no --sft_model is given."""
    from rlhf import sft
    from rlhf.runtime import parse_config

    out = runs_dir / "sft"
    if not (out / "summary.json").exists():
        sft.train(parse_config(sft.Config, ["--config", str(ROOT / "configs/rlhf/sft_tiny.yaml"), "--output_dir",
                                            str(out), "--progress", "false", "--report_to", "none",
                                            "--overwrite", "true"]))
    return out / "model"


def run_one(name: str, overrides: list[str], seed: int, sft_model: str, runs_dir: Path) -> dict:
    """One `rlhf grpo` run in this (worker) process; its summary."""
    import torch

    from rlhf import grpo
    from rlhf.runtime import parse_config

    torch.set_num_threads(1)
    out = runs_dir / name / f"seed{seed}"
    summary = out / "summary.json"
    if not summary.exists():
        argv = ["--config", str(GRPO_CONFIG), "--model_name_or_path", sft_model, "--seed", str(seed),
                "--output_dir", str(out), "--progress", "false", "--report_to", "none", "--overwrite", "true",
                *BUDGET, *overrides]
        grpo.train(parse_config(grpo.Config, argv))
    return json.loads(summary.read_text())


def plot(results: dict, variants: list, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(variants) + 1.5))
    y = np.arange(len(variants))
    for k, (key, colour, label) in enumerate([("eval/accuracy", "k", "all"),
                                               ("eval/accuracy_carry", "tab:red", "carry"),
                                               ("eval/accuracy_no_carry", "tab:blue", "no carry")]):
        for i, (name, _, _) in enumerate(variants):
            vals = [100 * results[(name, s)][key] for s in seeds if (name, s) in results]
            if vals:
                ax.scatter(vals, [y[i] + (k - 1) * 0.22] * len(vals), c=colour, s=14,
                           label=label if i == 0 else None)
    ax.set_yticks(y, [label for _, label, _ in variants], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(95, c="grey", lw=0.5, ls="--")
    ax.set_xlabel("greedy held-out accuracy (%), one dot per seed")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft_model", default="", help="the SFT model to start from (empty: train one with sft_tiny.yaml)")
    p.add_argument("--variants", default="", help="comma-separated variant names (empty: all): "
                                                  + ", ".join(n for n, _, _ in VARIANTS))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--runs_dir", default="runs/grpo_variants", help="where the runs go (reused if present)")
    p.add_argument("--out", default="results/grpo_variants.md", help="markdown table ('' to only print); plot: .png")
    args = p.parse_args()
    runs_dir = Path(args.runs_dir) if Path(args.runs_dir).is_absolute() else ROOT / args.runs_dir
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = [v for v in args.variants.split(",") if v]
    unknown = set(wanted) - {n for n, _, _ in VARIANTS}
    if unknown:
        p.error(f"unknown --variants {sorted(unknown)}; choose from {[n for n, _, _ in VARIANTS]}")
    variants = [v for v in VARIANTS if not wanted or v[0] in wanted]

    began = time.time()
    sft_model = args.sft_model or str(train_sft(runs_dir))
    results: dict = {}
    jobs = [(name, ov, s) for name, _, ov in variants for s in seeds]
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, name, ov, s, sft_model, runs_dir): (name, s) for name, ov, s in jobs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            name, s = futures[fut]
            r = results[(name, s)]
            print(f"[{i}/{len(jobs)}] {name} seed {s}: accuracy {100 * r['eval/accuracy']:.1f}%, carry "
                  f"{100 * r['eval/accuracy_carry']:.1f}%, no carry {100 * r['eval/accuracy_no_carry']:.1f}%, "
                  f"{r['time/train_s']:.0f} s ({time.time() - began:.0f} s)", flush=True)

    def cell(name, key, scale=100.0, spec=".1f"):
        vals = [scale * results[(name, s)][key] for s in seeds]
        per_seed = " / ".join(format(v, spec) for v in vals)
        return f"**{np.mean(vals):{spec}}** ({per_seed})" if len(vals) > 1 else per_seed

    def start(key):  # the SFT model on each seed's held-out prompts (the same in every variant's runs)
        return " / ".join(f"{100 * results[(variants[0][0], s)]['start/' + key]:.1f}" for s in seeds)

    cmd = "python scripts/reproduce_grpo_variants.py " + " ".join(sys.argv[1:])
    lines = [
        f"# GRPO variants on the built-in task (seeds {args.seeds}; 200 steps of 8 prompts x 8 each)",
        "",
        f"Command: `{cmd.strip()}` (this invocation: {(time.time() - began) / 60:.0f} min; it reuses finished runs, "
        "so it counts only the runs it made).",
        f"Start (the SFT model, greedy, per seed: each seed draws its own 500 held-out prompts): accuracy "
        f"{start('eval/accuracy')}%, carry {start('eval/accuracy_carry')}%, no carry "
        f"{start('eval/accuracy_no_carry')}%. Cells: mean (per seed); time: the stage's training seconds "
        "(wall clock, so it moves with the machine's load).",
        "",
        "| variant | options | accuracy % | carry % | no carry % | train s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, label, ov in variants:
        options = " ".join(ov) or "-"
        lines.append(f"| {label} | `{options}` | {cell(name, KEYS[0])} | {cell(name, KEYS[1])} | "
                     f"{cell(name, KEYS[2])} | {cell(name, KEYS[3], 1.0, '.0f')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        plot(results, variants, seeds, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
