"""`rlhf plot` / `classic plot`: curves from `metrics.jsonl`, several runs overlaid, one panel per metric, to PNG.

    rlhf plot runs/grpo runs/ppo --keys eval/accuracy,kl/ref --out curves.png
    classic plot runs/dqn-s1 runs/dqn-s2 runs/ddqn-s1 --smooth 10
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rlhf.runtime import read_jsonl

# Shown first when --keys is not given, in this order, if any run logged them.
PREFERRED_KEYS = [
    "eval/return_mean", "train/episode_return", "eval/accuracy", "eval/reward_mean", "reward/mean", "kl/ref",
    "kl/beta", "loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac", "policy/entropy",
    "value/explained_var", "eval/loss", "loss/train", "q/predicted_max", "time/sps",
]


def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    runs = {}
    for d in map(Path, run_dirs):
        path = d / "metrics.jsonl" if d.is_dir() else d
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no metrics.jsonl (is it a run directory?)")
        runs[str(d)] = read_jsonl(path)
    return runs


def numeric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def choose_keys(runs: dict[str, list[dict]], max_panels: int = 6) -> list[str]:
    present = {k for rows in runs.values() for k in numeric_keys(rows)}
    chosen = [k for k in PREFERRED_KEYS if k in present]
    chosen += sorted(present - set(chosen))
    return chosen[:max_panels]


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    windows = [ys[max(0, i + 1 - window):i + 1] for i in range(len(ys))]
    return [sum(w) / len(w) for w in windows]


def plot_runs(run_dirs, keys: list[str] | None = None, out: str | Path = "curves.png", smooth: int = 1,
              labels: list[str] | None = None, title: str | None = None) -> Path:
    """Draw one panel per metric with every run overlaid; returns the PNG path."""
    # here, not at the top: Agg is set just before pyplot loads, so importing rlhf.plot keeps a caller's backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(run_dirs)
    present = {k for rows in runs.values() for k in numeric_keys(rows)}
    unknown = [k for k in keys or [] if k not in present and f"start/{k}" not in present]
    if unknown:  # it would draw an empty panel
        raise ValueError(f"--keys: no run logged {', '.join(unknown)}; the runs have: {', '.join(sorted(present))}")
    keys = keys or choose_keys(runs)
    if not keys:
        raise ValueError("no numeric metrics to plot in " + ", ".join(runs))
    if labels and len(labels) != len(runs):  # zip would drop the runs without a label
        raise ValueError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    labels = labels or [Path(d).name or str(d) for d in runs]
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.3 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in zip(labels, runs.values()):
            # Stages log their evaluation before training as `start/<key>` at step 0: same curve.
            pts = [(r["step"], v) for r in rows if "step" in r
                   for v in (r.get(key, r.get(f"start/{key}")),) if isinstance(v, (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, _smooth(list(ys), smooth), label=label, marker="o" if len(xs) < 15 else None, ms=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if len(runs) > 1 else 0, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cli(argv: list[str], prog: str = "rlhf plot") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Plot metrics.jsonl curves of one or more runs to a PNG.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="Run directories (or metrics.jsonl files).")
    parser.add_argument("--keys", default="",
                        help="Comma-separated metric keys (default: the most useful logged ones).")
    parser.add_argument("--out", default="curves.png", help="Output PNG path.")
    parser.add_argument("--smooth", type=int, default=1, help="Moving-average window (points).")
    parser.add_argument("--labels", default="", help="Comma-separated legend labels, one per run.")
    parser.add_argument("--title", default=None, help="Figure title.")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.run_dirs, keys=[k for k in args.keys.split(",") if k] or None, out=args.out,
                         smooth=args.smooth, labels=[s for s in args.labels.split(",") if s] or None,
                         title=args.title)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {path}")
