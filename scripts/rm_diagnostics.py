"""Where a learned reward model on the built-in arithmetic task is right and wrong.

PPO against a learned RM can only fix what the RM ranks correctly. The SFT model's typical error is
the dropped carry (17+25= -> "32"), which the gold score rates 0.5 against 1.0 for "42": a labeller
with noise 0.5 puts the right answer above it with probability sigmoid(0.5 / 0.5) = 73% per label.
This script scores held-out prompts (never seen in SFT data, rankings or PPO prompts) and prints,
per RM directory, the share of pairs ranked right:

  right > dropped carry   carry prompts: exact answer vs the answer with the carry forgotten
  right > added carry     no-carry prompts: exact answer vs answer + 10 (a carry that is not there;
                          PPO against a reward model blind to it answers +10 on no-carry prompts)
  right > off by one      every prompt: exact answer vs answer +- 1 (gold 1.0 vs 0.5)
  right > far             exact answer vs a random far number (gold 1.0 vs 0.0)
  right > malformed       exact answer vs "?" (gold 1.0 vs -1.0)

    python scripts/rm_diagnostics.py RM_DIR [RM_DIR ...] [--num_prompts 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def pair_rows(num_prompts: int, seed: int) -> dict[str, list[dict]]:
    from rlhf.tasks import arithmetic

    rng = np.random.default_rng(seed)
    prompts = arithmetic.make_prompts(num_prompts, seed=seed, split="eval")
    rows: dict[str, list[dict]] = {"right > dropped carry": [], "right > added carry": [], "right > off by one": [],
                                   "right > far": [], "right > malformed": []}
    for p in prompts:
        right = arithmetic.gold_answer(p)
        s = int(right)
        if arithmetic.has_carry(p):
            dropped = arithmetic.dropped_carry_answer(p)
            rows["right > dropped carry"].append({"prompt": p, "chosen": right, "rejected": dropped})
        else:
            rows["right > added carry"].append({"prompt": p, "chosen": right, "rejected": str(s + 10)})
        off_by_one = s + 1 if rng.random() < 0.5 or s == 0 else s - 1
        rows["right > off by one"].append({"prompt": p, "chosen": right, "rejected": str(off_by_one)})
        far = s
        while abs(far - s) <= 10:
            far = int(rng.integers(0, 199))
        rows["right > far"].append({"prompt": p, "chosen": right, "rejected": str(far)})
        rows["right > malformed"].append({"prompt": p, "chosen": right, "rejected": "?"})
    return rows


def diagnose(model_dir: str, rows: dict[str, list[dict]]) -> dict[str, float]:
    from rlhf.reward import score_rows

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pairs in rows.items():
            path = Path(tmp) / "pairs.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
            scored = score_rows(model_dir, str(path))
            margins = np.array([r["chosen_score"] - r["rejected_score"] for r in scored])
            out[name] = float((margins > 0).mean())
            out[name + " margin"] = float(margins.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="Reward model directories (output_dir/model of `rlhf reward`).")
    parser.add_argument("--num_prompts", type=int, default=500, help="Held-out prompts to score.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out prompts and the perturbations.")
    args = parser.parse_args()
    for m in args.models:
        if not (Path(m) / "config.json").is_file():
            parser.error(f"{m}: not a model directory (no config.json)")
    import torch

    torch.set_num_threads(1)
    rows = pair_rows(args.num_prompts, args.seed)
    names = list(rows)
    print("| reward model | " + " | ".join(names) + " | mean margin right - dropped |")
    print("|---|" + "---|" * (len(names) + 1))
    for m in args.models:
        d = diagnose(m, rows)
        shares = " | ".join(f"{100 * d[n]:.1f}%" for n in names)
        print(f"| {m} | {shares} | {d['right > dropped carry margin']:.3f} |")


if __name__ == "__main__":
    main()
