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

For a reward model trained with `rlhf reward --logprob_coef c` (score = score head + c log p_RM(answer + EOS |
prompt)), two more rows split its score into the score head alone and the log-likelihood term alone.

With `--sft_model SFT_DIR` two more rows per table: the SFT model's own log-probability of each answer
(log pi_SFT(answer + EOS | prompt)) as the ranking, and RM score + c * log pi_SFT (`--logp_coef c`) for each RM.
(PPO with the KL in the reward, k1, optimises r - beta (log pi - log pi_SFT): per sample it sees the RM's score
plus beta log pi_SFT, so this row is close to what PPO's reward ranks.)

    python scripts/rm_diagnostics.py RM_DIR [RM_DIR ...] [--num_prompts 500] [--sft_model SFT_DIR --logp_coef 0.01]
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


def rm_margins(model_dir: str, rows: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Per kind of pair: the reward model's score of the right answer minus the other's."""
    from rlhf.reward import score_rows

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pairs in rows.items():
            path = Path(tmp) / "pairs.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
            out[name] = np.array([r["chosen_score"] - r["rejected_score"] for r in score_rows(model_dir, str(path))])
    return out


def head_margins(model_dir: str, rows: dict[str, list[dict]]) -> dict[str, np.ndarray] | None:
    """`rm_margins` of the score head alone, for a reward model trained with `logprob_coef` (else None)."""
    from rlhf.models.loading import LOGPROB_COEF
    from rlhf.rewards import RewardModelScorer

    scorer = RewardModelScorer(model_dir)
    coef = getattr(scorer.model.config, LOGPROB_COEF, 0.0)
    if not coef:
        return None
    setattr(scorer.model.config, LOGPROB_COEF, 0.0)
    out = {}
    for name, pairs in rows.items():
        prompts = [r["prompt"] for r in pairs]
        chosen = scorer(prompts, [r["chosen"] for r in pairs])
        out[name] = (chosen - scorer(prompts, [r["rejected"] for r in pairs])).numpy()
    return out


def logp_margins(sft_dir: str, rows: dict[str, list[dict]], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per kind of pair: log pi_SFT(right + EOS | prompt) - log pi_SFT(other + EOS | prompt)."""
    import datasets
    import torch

    from rlhf.data import tokenize_rankings
    from rlhf.dpo import collate, response_logps
    from rlhf.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(sft_dir), load_causal_lm(sft_dir).eval()
    out = {}
    for name, pairs in rows.items():
        ranked = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "ranks": [0, 1]} for r in pairs]
        groups = tokenize_rankings(datasets.Dataset.from_list(ranked), tokenizer, 64).examples
        with torch.no_grad():
            logps = torch.cat([response_logps(model, collate(groups[i:i + batch_size], tokenizer.pad_token_id),
                                              share_prompt_prefix=True)
                               for i in range(0, len(groups), batch_size)])  # (N, 2)
        out[name] = (logps[:, 0] - logps[:, 1]).numpy()
    return out


def table_row(label: str, margins: dict[str, np.ndarray]) -> str:
    shares = " | ".join(f"{100 * (m > 0).mean():.1f}%" for m in margins.values())
    return f"| {label} | {shares} | {margins['right > dropped carry'].mean():.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="Reward model directories (output_dir/model of `rlhf reward`).")
    parser.add_argument("--num_prompts", type=int, default=500, help="Held-out prompts to score.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out prompts and the perturbations.")
    parser.add_argument("--sft_model", default="", help="SFT model directory: also rank by its log-prob of each "
                                                        "answer, alone and added to each RM's score.")
    parser.add_argument("--logp_coef", type=float, default=0.01, help="c in RM score + c * log pi_SFT.")
    args = parser.parse_args()
    for m in args.models + ([args.sft_model] if args.sft_model else []):
        if not (Path(m) / "config.json").is_file():
            parser.error(f"{m}: not a model directory (no config.json)")
    import torch

    torch.set_num_threads(1)
    rows = pair_rows(args.num_prompts, args.seed)
    names = list(rows)
    print("| reward model | " + " | ".join(names) + " | mean margin right - dropped |")
    print("|---|" + "---|" * (len(names) + 1))
    logp = logp_margins(args.sft_model, rows) if args.sft_model else None
    if logp is not None:
        print(table_row(f"log pi_SFT of {args.sft_model}", logp))
    for m in args.models:
        rm = rm_margins(m, rows)
        print(table_row(m, rm))
        head = head_margins(m, rows)
        if head is not None:  # the two parts of a `logprob_coef` model's score
            print(table_row(f"{m}: score head alone", head))
            print(table_row(f"{m}: its log-likelihood term alone", {n: rm[n] - head[n] for n in names}))
        if logp is not None:
            combined = {n: rm[n] + args.logp_coef * logp[n] for n in names}
            print(table_row(f"{m} + {args.logp_coef:g} log pi_SFT", combined))


if __name__ == "__main__":
    main()
