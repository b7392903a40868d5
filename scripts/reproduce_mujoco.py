"""Learning targets of the policy-gradient family: MuJoCo (PPO, TRPO) and CartPole, over seeds, as a table.

Each row runs a shipped config (configs/classic/*.yaml) for every seed and reports the final
evaluation return (10 episodes of the deterministic policy, observation statistics frozen) as
mean +- std over seeds, next to the target and a peer's published number.

Full budget (the README table; 1M steps per run, 9 runs of 15-60 min of one core each, by load):
    python scripts/reproduce_mujoco.py --suite mujoco --jobs 3
CartPole target (PPO >= 475 within 100k steps on at least 2 of 3 seeds; minutes):
    python scripts/reproduce_mujoco.py --suite cartpole --algos ppo --out results/mujoco.md --append
TRPO's HalfCheetah and Walker2d configs (no targets; seed 1 in results/trpo_mujoco.md):
    python scripts/reproduce_mujoco.py --suite trpo_mujoco --seeds 1 --jobs 2
A reduced budget (same configs, fewer steps; numbers are then not comparable with the targets):
    python scripts/reproduce_mujoco.py --suite mujoco --timesteps 100000 --seeds 1
Runs whose summary.json exists are reused, so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np

from classic import pg, ppo, trpo
from rlhf.runtime import parse_config

ROOT = Path(__file__).resolve().parents[1]

# (algorithm, config, target on the final evaluation return, peer's number and source)
SUITES = {
    "mujoco": [
        ("ppo", "ppo_hopper", 2400, "CleanRL 2383 +- 272 (Hopper-v4)"),
        ("ppo", "ppo_halfcheetah", 1500, "CleanRL 1443 +- 46 (HalfCheetah-v4)"),
        ("trpo", "trpo_hopper", 2500, "sb3-contrib 3372 +- 215 (Hopper-v3)"),
    ],
    # No targets: TRPO's other MuJoCo configs, next to rl-baselines3-zoo's benchmark (one agent each, 1M steps)
    "trpo_mujoco": [
        ("trpo", "trpo_halfcheetah", None, "rl-zoo 1785 +- 69 (HalfCheetah-v3, 1 agent)"),
        ("trpo", "trpo_walker2d", None, "rl-zoo 4933 +- 1453 (Walker2d-v3, 1 agent)"),
    ],
    "cartpole": [
        ("ppo", "ppo_cartpole", 475, "CleanRL 490 +- 6 at 500k steps"),
        ("trpo", "trpo_cartpole", None, ""),
        ("pg", "pg_cartpole", None, ""),
    ],
}


def run_one(algo: str, config: str, seed: int, timesteps: int | None, runs_dir: Path) -> dict:
    """One training run in this (worker) process; returns its summary."""
    out = runs_dir / config / f"seed{seed}"
    summary = out / "summary.json"
    if not summary.exists():
        module = {"pg": pg, "ppo": ppo, "trpo": trpo}[algo]
        argv = ["--config", str(ROOT / "configs" / "classic" / f"{config}.yaml"), "--seed", str(seed),
                "--output_dir", str(out), "--progress", "false", "--overwrite", "true"]
        if timesteps:
            argv += ["--total_timesteps", str(timesteps)]
        module.train(parse_config(module.Config, argv))
    return json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="mujoco", choices=sorted(SUITES))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--timesteps", type=int, default=0, help="override every config's total_timesteps (0: the config's)")
    p.add_argument("--algos", default="", help="only these algorithms of the suite (comma-separated; default all)")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: tabulate the finished runs in runs_dir (missing seeds are left out)")
    p.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--runs_dir", default="", help="where the runs go (default runs/reproduce_<suite>[_<timesteps>])")
    p.add_argument("--out", default="", help="markdown file for the table (default results/<suite>.md for the mujoco "
                                             "and trpo_mujoco suites, none for the others)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = [r for r in SUITES[args.suite] if not args.algos or r[0] in args.algos.split(",")]
    runs_dir = ROOT / (args.runs_dir or f"runs/reproduce_{args.suite}"
                       + (f"_{args.timesteps}" if args.timesteps else ""))

    start = time.time()
    summaries: dict = {}
    todo = [(algo, config, s) for algo, config, _, _ in rows for s in seeds]
    if args.report_only:
        for algo, config, s in todo:
            if (runs_dir / config / f"seed{s}" / "summary.json").exists():
                summaries[(config, s)] = json.loads((runs_dir / config / f"seed{s}" / "summary.json").read_text())
        todo = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, algo, config, s, args.timesteps or None, runs_dir): (config, s)
                   for algo, config, s in todo}
        for fut in concurrent.futures.as_completed(futures):
            summaries[futures[fut]] = fut.result()
            config, s = futures[fut]
            print(f"{config} seed {s}: eval {summaries[(config, s)]['eval/return_mean']:.1f} "
                  f"({summaries[(config, s)]['time/sps']:.0f} steps/s; {time.time() - start:.0f}s)", flush=True)

    cmd = "python scripts/reproduce_mujoco.py " + " ".join(__import__("sys").argv[1:])
    budget = f"{args.timesteps:,} steps per run" if args.timesteps else "config budget"
    lines = [
        f"# Policy-gradient family: {args.suite} ({budget}; seeds {args.seeds})",
        "",
        f"Command: `{cmd.strip()}` ({(time.time() - start) / 60:.0f} min on this machine).",
        "Final evaluation: 10 episodes of the deterministic policy per seed; mean +- std over seeds.",
        "",
        "| algorithm | config | steps | per seed | mean +- std | target | met | peer |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for algo, config, target, peer in rows:
        done = [s for s in seeds if (config, s) in summaries]
        target_text = target if target is not None else "-"
        if not done:
            lines.append(f"| {algo} | {config} | - | not run | - | {target_text} | - | {peer} |")
            continue
        evals = [summaries[(config, s)]["eval/return_mean"] for s in done]
        steps = summaries[(config, done[0])]["global_step"]
        met = "" if target is None else (f"{sum(e >= target for e in evals)}/{len(evals)} seeds; "
                                         f"mean {'yes' if np.mean(evals) >= target else 'no'}")
        lines.append(f"| {algo} | {config} | {steps:,} | {', '.join(f'{e:.0f}' for e in evals)} | "
                     f"{np.mean(evals):.1f} +- {np.std(evals):.1f} (seeds {','.join(map(str, done))}) | "
                     f"{target_text} | {met} | {peer} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or {"mujoco": "results/mujoco.md", "trpo_mujoco": "results/trpo_mujoco.md"}.get(args.suite, "")
    if out:
        (ROOT / out).parent.mkdir(parents=True, exist_ok=True)
        with open(ROOT / out, "a" if args.append else "w") as fh:
            fh.write(("\n" if args.append else "") + text)


if __name__ == "__main__":
    main()
