"""Reproduce the PPO paper's Table 1: eleven surrogate objectives on MuJoCo, normalised scores.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", sec. 6.1 / Table 1: no clipping
or penalty; clipping eps = 0.1 / 0.2 / 0.3; adaptive KL with d_targ = 0.003 / 0.01 / 0.03; fixed
KL with beta = 0.3 / 1 / 3 / 10. Every other hyper-parameter is the paper's MuJoCo setting
(Table 3, configs/classic/ppo_hopper.yaml): horizon 2048, Adam 3e-4, 10 epochs, minibatch 64,
gamma 0.99, lambda 0.95. The score of a run is, as in the paper, the mean return of the last 100
training episodes; per environment it is normalised so a random policy scores 0 and the best
variant 1, then averaged over environments (and seeds are averaged before normalising).

Default (2 envs x 11 variants x 20k steps, 1 seed; ~30 min with --jobs 2 on this shared 2-core machine):
    python scripts/reproduce_ppo_table.py
The paper's full budget (7 environments, 3 seeds, 1M steps: ~230 runs, days on a CPU):
    python scripts/reproduce_ppo_table.py \
        --envs HalfCheetah-v5,Hopper-v5,InvertedDoublePendulum-v5,InvertedPendulum-v5,Reacher-v5,Swimmer-v5,Walker2d-v5\
        --seeds 1,2,3 --timesteps 1000000 --jobs 8 --runs_dir runs/ppo_table_full --out results/ppo_table_full.md
Runs whose summary.json exists are reused, so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

from classic import ppo
from rlhf.runtime import parse_config

ROOT = Path(__file__).resolve().parents[1]

# (label, command-line overrides, the paper's average normalised score)
VARIANTS = [
    ("No clipping or penalty", ["--penalty", "none"], -0.39),
    ("Clipping, eps = 0.1", ["--penalty", "clip", "--clip_eps", "0.1"], 0.76),
    ("Clipping, eps = 0.2", ["--penalty", "clip", "--clip_eps", "0.2"], 0.82),
    ("Clipping, eps = 0.3", ["--penalty", "clip", "--clip_eps", "0.3"], 0.70),
    ("Adaptive KL, d_targ = 0.003", ["--penalty", "adaptive_kl", "--kl_target", "0.003"], 0.68),
    ("Adaptive KL, d_targ = 0.01", ["--penalty", "adaptive_kl", "--kl_target", "0.01"], 0.74),
    ("Adaptive KL, d_targ = 0.03", ["--penalty", "adaptive_kl", "--kl_target", "0.03"], 0.71),
    ("Fixed KL, beta = 0.3", ["--penalty", "fixed_kl", "--kl_beta", "0.3"], 0.62),
    ("Fixed KL, beta = 1", ["--penalty", "fixed_kl", "--kl_beta", "1"], 0.71),
    ("Fixed KL, beta = 3", ["--penalty", "fixed_kl", "--kl_beta", "3"], 0.72),
    ("Fixed KL, beta = 10", ["--penalty", "fixed_kl", "--kl_beta", "10"], 0.69),
]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def random_score(env_id: str, episodes: int = 20, seed: int = 0) -> float:
    """Mean return of a uniformly random policy (the 0 of the normalised score)."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    returns = []
    for i in range(episodes):
        env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            _, r, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(r)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


def run_one(env_id: str, label: str, overrides: list[str], seed: int, timesteps: int, runs_dir: Path) -> float:
    """One `classic ppo` run, in this (worker) process."""
    out = runs_dir / env_id / slug(label) / f"seed{seed}"
    summary = out / "summary.json"
    if not summary.exists():
        argv = ["--config", str(ROOT / "configs/classic/ppo_hopper.yaml"), "--env_id", env_id,
                "--total_timesteps", str(timesteps), "--seed", str(seed), "--output_dir", str(out),
                "--eval_episodes", "0", "--progress", "false", "--report_to", "none", "--overwrite", "true", *overrides]
        ppo.train(parse_config(ppo.Config, argv))
    return float(json.loads(summary.read_text())["train/episode_return_last100"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="Hopper-v5,InvertedPendulum-v5", help="comma-separated MuJoCo env ids")
    p.add_argument("--seeds", default="1", help="comma-separated seeds")
    p.add_argument("--timesteps", type=int, default=20_000, help="environment steps per run (paper: 1,000,000)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--runs_dir", default="runs/ppo_table", help="where the runs go (reused if present)")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: tabulate the finished runs in runs_dir (missing ones shown as -)")
    p.add_argument("--out", default="results/ppo_table.md", help="markdown file for the table ('' to only print)")
    args = p.parse_args()
    envs = [e for e in args.envs.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs_dir = (ROOT / args.runs_dir) if not Path(args.runs_dir).is_absolute() else Path(args.runs_dir)

    start = time.time()
    jobs = {(e, label, s): (e, label, ov, s) for e in envs for label, ov, _ in VARIANTS for s in seeds}
    scores: dict = {}
    if args.report_only:
        for (e, label, s) in jobs:
            summary = runs_dir / e / slug(label) / f"seed{s}" / "summary.json"
            if summary.exists():
                scores[(e, label, s)] = float(json.loads(summary.read_text())["train/episode_return_last100"])
        jobs = {}
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, e, label, ov, s, args.timesteps, runs_dir): key
                   for key, (e, label, ov, s) in jobs.items()}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            scores[futures[fut]] = fut.result()
            e, label, s = futures[fut]
            print(f"[{i}/{len(jobs)}] {e} {label} seed {s}: {scores[futures[fut]]:.1f}  "
                  f"({time.time() - start:.0f}s)", flush=True)

    rand = {e: random_score(e) for e in envs}
    nan = float("nan")
    raw = {(e, label): float(np.mean([scores.get((e, label, s), nan) for s in seeds]))
           for e in envs for label, _, _ in VARIANTS}
    best = {e: np.nanmax([raw[(e, label)] for label, _, _ in VARIANTS]) for e in envs}
    norm = {(e, label): (raw[(e, label)] - rand[e]) / (best[e] - rand[e]) for (e, label) in raw}

    cmd = "python scripts/reproduce_ppo_table.py " + " ".join(sys.argv[1:])
    lines = [
        f"# PPO paper Table 1, reproduced ({', '.join(envs)}; seeds {args.seeds}; {args.timesteps:,} steps per run)",
        "",
        f"Command: `{cmd.strip()}` ({(time.time() - start) / 60:.0f} min on this machine).",
        "Score = mean return of the last 100 training episodes; per env, random policy = 0 and best variant = 1.",
        "The paper's column: 7 MuJoCo envs, 3 seeds, 1M steps (Schulman et al. 2017, Table 1).",
        "",
        "| variant | " + " | ".join(f"{e} (raw)" for e in envs) + " | " + " | ".join(envs)
        + " | avg. normalised | paper |",
        "|---|" + "---:|" * (2 * len(envs) + 2),
    ]
    def fmt(x: float, spec: str) -> str:
        return "-" if np.isnan(x) else format(x, spec)

    for label, _, paper in VARIANTS:
        avg = float(np.mean([norm[(e, label)] for e in envs]))  # nan if a run is missing
        lines.append(f"| {label} | " + " | ".join(fmt(raw[(e, label)], ".1f") for e in envs) + " | "
                     + " | ".join(fmt(norm[(e, label)], ".2f") for e in envs)
                     + f" | **{fmt(avg, '.2f')}** | {paper:.2f} |")
    lines.append("| random policy | " + " | ".join(f"{rand[e]:.1f}" for e in envs) + " | "
                 + " | ".join("0" for _ in envs) + " | 0 | 0 |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
