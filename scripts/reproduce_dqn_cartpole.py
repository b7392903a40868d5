"""Reproduce the CartPole-v1 target of the DQN family: every variant's FINAL evaluation at 100k steps
>= 475 on 3 of 3 seeds with the shipped config (configs/classic/dqn_cartpole.yaml).

    python scripts/reproduce_dqn_cartpole.py --jobs 2                 # 7 variants x 3 seeds, full runs
    python scripts/reproduce_dqn_cartpole.py --variants double+dueling-max+per --seeds 1 --set learning_rate=1e-3

Each run trains for the config's total_timesteps; the table gives, per seed, the final evaluation
(greedy episodes after the last step), the best periodic evaluation and the first step at which
one reached the threshold. A variant meets the target when its final evaluation does on every
seed. `--stop_early true` instead stops each run at its first evaluation >= threshold (the older,
weaker "reaches within 100k" question; its "final" is then that evaluation). `--set key=value`
overrides config options (YAML values) for every run, for sweeps. A run whose directory holds a
summary.json from the same resolved config is reused, not rerun. Writes <out>/table.md and rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from classic import dqn
from rlhf.runtime import config_to_dict, load_yaml_config, make_config, read_jsonl, to_jsonable

VARIANTS = {
    "dqn": {},
    "double": {"double_q": True},
    "dueling-mean": {"dueling": "mean"},
    "dueling-max": {"dueling": "max"},
    "per": {"prioritized": True},
    "double+dueling+per": {"double_q": True, "dueling": "mean", "prioritized": True},
    "double+dueling-max+per": {"double_q": True, "dueling": "max", "prioritized": True},
}


def run_one(base: dict, name: str, seed: int, out_root: str, threshold: float, stop_early: bool) -> dict:
    out = Path(out_root) / f"{name}-s{seed}"
    cfg = make_config(dqn.Config, {**base, **VARIANTS[name], "seed": seed, "output_dir": str(out), "overwrite": True,
                                   "progress": False, "report_to": "none", "save_buffer": False,
                                   "stop_at_return": threshold if stop_early else None})
    resolved = yaml.safe_dump(to_jsonable(config_to_dict(cfg)), sort_keys=False)
    done = out / "summary.json"
    if done.exists() and (out / "config.yaml").read_text() == resolved:  # the same run finished before: reuse it
        summary = json.loads(done.read_text())
    else:
        summary = dqn.train(cfg)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/return_mean" in r]  # periodic ones, then final
    hit = next((r["step"] for r in evals if r["eval/return_mean"] >= threshold), None)
    row = {"variant": name, "seed": seed, "final": summary["eval/return_mean"], "final_step": summary["global_step"],
           "best": summary["eval/best_return_mean"], "reached_at": hit, "sps": summary["time/sps"],
           "cpu_sps": summary["time/cpu_sps"]}
    print(json.dumps(row), flush=True)
    return row


def table(results: list[dict], names: list[str], threshold: float) -> str:
    lines = [f"| variant | final eval (per seed) | best eval (per seed) | first step >= {threshold:g} (per seed) "
             f"| seeds with final >= {threshold:g} | target met (all seeds) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        rows = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        n_ok = sum(r["final"] >= threshold for r in rows)
        final = ", ".join(f"{r['final']:.1f}" for r in rows)
        best = ", ".join(f"{r['best']:.1f}" for r in rows)
        steps = ", ".join(f"{r['reached_at'] // 1000}k" if r["reached_at"] else "-" for r in rows)
        lines.append(f"| {name} | {final} | {best} | {steps} | {n_ok}/{len(rows)} | "
                     f"{'yes' if n_ok == len(rows) else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/classic/dqn_cartpole.yaml")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threshold", type=float, default=475.0)
    p.add_argument("--stop_early", default="false", choices=("true", "false"),
                   help="stop each run at its first evaluation >= threshold (then 'final' is that evaluation)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config option for every run (YAML value); repeatable")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--out", default="runs/reproduce_dqn_cartpole")
    args = p.parse_args(argv)
    base = load_yaml_config(args.config, dqn.Config)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set: expected KEY=VALUE, got {item!r}")
        base[key] = yaml.safe_load(value)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    jobs = [(base, name, seed, args.out, args.threshold, args.stop_early == "true") for seed in seeds for name in names]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs)))
    text = table(results, names, args.threshold)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(text + "\n")
    (Path(args.out) / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    sys.exit(main())
