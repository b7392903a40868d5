"""The RLHF pipeline on several seeds: per-seed figures and their spread (mean, min, max) in one markdown file.

    python scripts/pipeline_seeds.py --seeds 1,2,3 --output_dir runs/seeds --out results/rlhf_pipeline.md
    python scripts/pipeline_seeds.py --seeds 1,2 -- --stages sft,grpo      # arguments after -- go to the pipeline

Seed N runs `rlhf pipeline --output_dir OUTPUT_DIR/seed_N --seed N` (pipeline_tiny.yaml unless the pipeline
arguments give a --config); the pipeline skips the stages it finished before, so re-running after a crash or
with more seeds trains only what is missing. Each seed's reward model is also measured on the held-out pairs
of scripts/rm_diagnostics.py (right answer vs dropped carry, added carry, off by one).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import numpy as np

POLICIES = ("sft", "dpo", "ppo", "grpo")
POLICY_COLUMNS = {"held-out accuracy": "eval/accuracy", "carry": "eval/accuracy_carry",
                  "no carry": "eval/accuracy_no_carry", "gold score": "eval/reward_mean", "KL to SFT": "kl/ref",
                  "wall time (s)": "time/wall_s"}
RM_COLUMNS = ("eval/accuracy", "right > dropped carry", "right > added carry", "right > off by one")


def _rm_diagnostics():
    path = Path(__file__).resolve().parent / "rm_diagnostics.py"
    spec = importlib.util.spec_from_file_location("rm_diagnostics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_seed(seed: int, output_dir: Path, pipeline_args: list[str], num_rm_prompts: int) -> dict:
    """One pipeline run (finished stages skipped); its summary, with the reward model's diagnostics added."""
    from rlhf import pipeline

    cfg = pipeline.parse_args([*pipeline_args, "--output_dir", str(output_dir / f"seed_{seed}"), "--seed", str(seed)])
    summary = pipeline.train(cfg)
    rm_dir = Path(cfg.reward_model_path or Path(cfg.output_dir) / "reward" / "model")
    if (rm_dir / "config.json").is_file() and num_rm_prompts > 0:
        rm = _rm_diagnostics()
        margins = rm.rm_margins(str(rm_dir), rm.pair_rows(num_rm_prompts, seed=0))
        summary.setdefault("reward", {}).update({k: float((m > 0).mean()) for k, m in margins.items()})
    return summary


def spread(values: list) -> tuple[float, float, float] | None:
    """(mean, min, max) of the finite values, None when there are none."""
    v = np.array([x for x in values if isinstance(x, (int, float)) and np.isfinite(x)], dtype=float)
    return (float(v.mean()), float(v.min()), float(v.max())) if v.size else None


def _cell(s: tuple[float, float, float] | None, percent: bool) -> str:
    if s is None:
        return "-"
    f = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}")
    return f"{f(s[0])} ({f(s[1])}-{f(s[2])})"


def report(summaries: dict[int, dict], command: str) -> str:
    """Markdown: policies and reward model as mean (min-max) over the seeds, then each seed's figures."""
    seeds = list(summaries)
    lines = [f"# RLHF pipeline over seeds {', '.join(map(str, seeds))}", "",
             f"`{command}`", "",
             "Held-out prompts, greedy decoding; accuracies in %; each cell: mean (min-max) over the seeds.", "",
             "| policy | " + " | ".join(POLICY_COLUMNS) + " |", "|---|" + "---|" * len(POLICY_COLUMNS)]
    for stage in POLICIES:
        if any(stage in s for s in summaries.values()):
            cells = [_cell(spread([s.get(stage, {}).get(k) for s in summaries.values()]), "accuracy" in k)
                     for k in POLICY_COLUMNS.values()]
            lines.append(f"| {stage.upper()} | " + " | ".join(cells) + " |")
    if any("reward" in s for s in summaries.values()):
        lines += ["", "Reward model (held-out pairs ranked right, %):", "",
                  "| | " + " | ".join(c.replace("eval/accuracy", "all gold-ordered pairs") for c in RM_COLUMNS) + " |",
                  "|---|" + "---|" * len(RM_COLUMNS),
                  "| reward model | " + " | ".join(
                      _cell(spread([s.get("reward", {}).get(c) for s in summaries.values()]), True) for c in RM_COLUMNS)
                  + " |"]
    lines += ["", "Per seed (accuracy / carry / no carry, %):", "",
              "| seed | " + " | ".join(s.upper() for s in POLICIES) + " | RM: dropped / added / off by one |",
              "|---|" + "---|" * (len(POLICIES) + 1)]
    for seed, s in summaries.items():
        cells = []
        for stage in POLICIES:
            row = s.get(stage, {})
            keys = ("eval/accuracy", "eval/accuracy_carry", "eval/accuracy_no_carry")
            cells.append(" / ".join(f"{100 * row[k]:.1f}" for k in keys) if all(k in row for k in keys) else "-")
        rm = s.get("reward", {})
        cells.append(" / ".join(f"{100 * rm[c]:.1f}" if c in rm else "-" for c in RM_COLUMNS[1:]))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pipeline_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3", help="Comma-separated seeds, one pipeline run each.")
    parser.add_argument("--output_dir", default="runs/seeds", help="Parent directory of the seed_N pipeline runs.")
    parser.add_argument("--out", default="", help="Markdown file for the table (default: OUTPUT_DIR/seeds.md).")
    parser.add_argument("--num_rm_prompts", type=int, default=500,
                        help="Held-out prompts of the reward-model diagnostics (0: skip them).")
    args = parser.parse_args(own)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers expected, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    output_dir = Path(args.output_dir)
    summaries = {s: run_seed(s, output_dir, pipeline_args, args.num_rm_prompts) for s in seeds}
    text = report(summaries, "python scripts/pipeline_seeds.py " + shlex.join(argv))
    out = Path(args.out) if args.out else output_dir / "seeds.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
