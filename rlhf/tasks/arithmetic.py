"""The built-in `arithmetic` task: prompt `"{a}+{b}="` with a, b in [0, 99], answer `str(a + b)` then EOS.

Why this task: it is learnable in a minute on a CPU, the gold answer is known, and a systematic
"human" error leaves room for RL. The SFT demonstrations drop the carry on a share of the prompts
whose units digits carry (17+25= -> "32" instead of "42"), so an SFT model answers many carry
prompts wrong under greedy decoding while sampling still finds the right answer sometimes.

Gold score of a completion (the text after the prompt, special tokens removed, whitespace stripped):
  1.0 exact; 0.5 close (a number within 10 of the answer, e.g. a dropped carry); 0.0 far (any other
  number); -1.0 malformed (not a plain non-negative integer of at most 3 digits).

Held-out evaluation prompts come from a fixed 10% of the 10,000 (a, b) pairs that training prompts,
SFT data and rankings never use, so evaluation measures generalisation.

Rankings: K distinct candidate answers per prompt, drawn around the gold answer (exact, dropped carry,
off by one, off by ten, far, malformed), ordered by a noisy labeller: Plackett-Luce sampling with
weights exp(gold_score / noise), whose pairwise marginals are Bradley-Terry,
P(i ranked above j) = sigmoid((s_i - s_j) / noise). `noise=0` ranks by gold score (equal scores tie).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rlhf.data import write_jsonl

_PROMPT = re.compile(r"^\s*(\d{1,2})\+(\d{1,2})=\s*$")
_NUMBER = re.compile(r"^\d{1,3}$")
SCORE_EXACT, SCORE_CLOSE, SCORE_FAR, SCORE_MALFORMED = 1.0, 0.5, 0.0, -1.0
_HELD_OUT_SHARE = 0.1
_SPLIT_SEED = 20240501  # fixes which (a, b) pairs are held out, forever


# ---------------------------------------------------------------------------------------------
# Prompts and the gold scorer
# ---------------------------------------------------------------------------------------------


def parse_prompt(prompt: str) -> tuple[int, int]:
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt of the form 'a+b=': {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def _pairs(split: str) -> np.ndarray:
    """Indices a*100+b of the train or held-out pairs; the split is fixed by `_SPLIT_SEED`."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(10_000)
    n_held = int(10_000 * _HELD_OUT_SHARE)
    if split == "eval":
        return np.sort(perm[:n_held])
    if split == "train":
        return np.sort(perm[n_held:])
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def make_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """`n` prompts from the training pairs (or the held-out ones), without repeats while there are enough."""
    pool = _pairs(split)
    idx = np.random.default_rng(seed).choice(pool, size=n, replace=n > len(pool))
    return [f"{i // 100}+{i % 100}=" for i in idx]


def has_carry(prompt: str) -> bool:
    a, b = parse_prompt(prompt)
    return a % 10 + b % 10 >= 10


def gold_answer(prompt: str) -> str:
    a, b = parse_prompt(prompt)
    return str(a + b)


def dropped_carry_answer(prompt: str) -> str:
    """The systematic human error: units digit right, the carry into the tens forgotten."""
    a, b = parse_prompt(prompt)
    return str(a + b - 10) if has_carry(prompt) else str(a + b)


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        completion = completion[-1]["content"] if completion else ""
    return completion.strip()


def is_well_formed(completion) -> bool:
    return bool(_NUMBER.match(_text(completion)))


def gold_score(prompt: str, completion) -> float:
    """1.0 exact / 0.5 within 10 / 0.0 other number / -1.0 malformed (see the module docstring)."""
    text = _text(completion)
    if not _NUMBER.match(text):
        return SCORE_MALFORMED
    diff = abs(int(text) - int(gold_answer(prompt)))
    return SCORE_EXACT if diff == 0 else SCORE_CLOSE if diff <= 10 else SCORE_FAR


# ---------------------------------------------------------------------------------------------
# Reward functions, TRL convention: fn(prompts, completions, **dataset_columns) -> list[float]
# ---------------------------------------------------------------------------------------------


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational prompt: the last user message holds "a+b="
        prompt = prompt[-1]["content"]
    return prompt


def exact_match_reward(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion is exactly the sum, else 0.0."""
    return [float(_text(c) == gold_answer(_prompt_text(p))) for p, c in zip(prompts, completions)]


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion is a plain number (at most 3 digits), else 0.0."""
    return [float(is_well_formed(c)) for c in completions]


def gold_score_reward(prompts, completions, **columns) -> list[float]:
    """The gold score: 1.0 exact, 0.5 close, 0.0 far, -1.0 malformed."""
    return [gold_score(_prompt_text(p), c) for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------------------------------------
# Evaluation of a policy by generation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], batch_size: int = 64, max_new_tokens: int = 8,
                         do_sample: bool = False, temperature: float = 1.0,
                         num_return_sequences: int = 1) -> list[tuple[str, bool]]:
    """Generate (KV cache, left padding); returns (completion text, ended with EOS) per sequence, prompt-major."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(device)
            seqs = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
            new = seqs[:, batch["input_ids"].shape[1]:]  # (B * n, <= max_new_tokens)
            ended = (new == tokenizer.eos_token_id).any(dim=1)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out += list(zip(texts, ended.tolist()))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return out


def evaluate_policy(model, tokenizer, prompts: Sequence[str], batch_size: int = 64, max_new_tokens: int = 8) -> dict:
    """Greedy answers to `prompts`: accuracy (overall, with and without a carry), mean gold score, well-formed share.

    Well-formed = a plain number followed by EOS within `max_new_tokens`.
    """
    results = generate_completions(model, tokenizer, prompts, batch_size, max_new_tokens)
    exact = np.array([_text(c) == gold_answer(p) for p, (c, _) in zip(prompts, results)], dtype=float)
    carry = np.array([has_carry(p) for p in prompts])
    return {
        "eval/accuracy": float(exact.mean()),
        "eval/reward_mean": float(np.mean([gold_score(p, c) for p, (c, _) in zip(prompts, results)])),
        "eval/well_formed": float(np.mean([is_well_formed(c) and ended for c, ended in results])),
        "eval/accuracy_carry": float(exact[carry].mean()) if carry.any() else float("nan"),
        "eval/accuracy_no_carry": float(exact[~carry].mean()) if (~carry).any() else float("nan"),
    }


def evaluate_pass_at_k(model, tokenizer, prompts: Sequence[str], k: int = 8, temperature: float = 1.0,
                       batch_size: int = 64, max_new_tokens: int = 8) -> dict:
    """Share of prompts (all / carry only) where at least one of `k` samples at `temperature` is exact."""
    results = generate_completions(model, tokenizer, prompts, max(1, batch_size // k), max_new_tokens, do_sample=True,
                                   temperature=temperature, num_return_sequences=k)
    hit = np.array([any(_text(results[i * k + j][0]) == gold_answer(p) for j in range(k))
                    for i, p in enumerate(prompts)])
    carry = np.array([has_carry(p) for p in prompts])
    return {f"eval/pass@{k}": float(hit.mean()),
            f"eval/pass@{k}_carry": float(hit[carry].mean()) if carry.any() else float("nan")}


# ---------------------------------------------------------------------------------------------
# Data writers (standard JSONL)
# ---------------------------------------------------------------------------------------------


def make_sft_rows(n: int, seed: int, carry_error_rate: float = 0.6) -> list[dict]:
    """Demonstrations (prompt, completion); `carry_error_rate` of the carry prompts drop the carry."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for prompt in make_prompts(n, seed):
        wrong = has_carry(prompt) and rng.random() < carry_error_rate
        rows.append({"prompt": prompt, "completion": dropped_carry_answer(prompt) if wrong else gold_answer(prompt)})
    return rows


def candidate_answers(prompt: str, k: int, rng: np.random.Generator) -> list[str]:
    """`k` distinct candidate completions around the gold answer, covering every gold-score level."""
    a, b = parse_prompt(prompt)
    s = a + b
    pool = [str(s), dropped_carry_answer(prompt), str(s + 1), str(max(s - 1, 0)), str(s + 10), str(abs(s - 10)),
            str(int(rng.integers(0, 199))), str(int(rng.integers(0, 199))), str(s) + str(int(rng.integers(0, 10))),
            "?", f"{s}+", f"{a}{b}", "-" + str(s), f"{s // 10} {s % 10}"]
    distinct = list(dict.fromkeys(pool))  # first occurrences, in order
    seen = set(distinct)
    if k > 100:
        raise ValueError(f"completions_per_prompt={k}: at most 100 distinct candidates per prompt")
    while len(distinct) < k:  # top up with far numbers (rare: small sums collapse several perturbations)
        extra = str(int(rng.integers(0, 1000)))
        if extra not in seen:
            seen.add(extra)
            distinct.append(extra)
    pick = rng.choice(len(distinct), size=k, replace=False)
    if 0 not in pick and rng.random() < 0.5:  # keep the exact answer in about half of the groups that missed it
        pick[0] = 0
    return [distinct[i] for i in pick]


def noisy_ranks(scores: Sequence[float], noise: float, rng: np.random.Generator) -> list[int]:
    """Ranks (0 = best) from a Plackett-Luce labeller with weights exp(score / noise); noise=0: by score, ties equal."""
    scores = np.asarray(scores, dtype=float)
    if noise <= 0:
        order = sorted(set(scores.tolist()), reverse=True)
        return [order.index(s) for s in scores.tolist()]
    remaining, ranks = list(range(len(scores))), [0] * len(scores)
    for position in range(len(scores)):
        logits = scores[remaining] / noise
        p = np.exp(logits - logits.max())
        chosen = remaining[int(rng.choice(len(remaining), p=p / p.sum()))]
        ranks[chosen] = position
        remaining.remove(chosen)
    return ranks


def make_ranking_rows(prompts: Sequence[str], completions_per_prompt: int, seed: int, noise: float = 0.5,
                      completions: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """Rows of `prompt`, `completions` (K strings), `ranks` (K ints, 0 = best) from the noisy labeller.

    `completions` (one list per prompt, e.g. sampled from a model) replaces the built-in candidates.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        cands = (list(completions[i]) if completions is not None
                 else candidate_answers(prompt, completions_per_prompt, rng))
        ranks = noisy_ranks([gold_score(prompt, c) for c in cands], noise, rng)
        rows.append({"prompt": prompt, "completions": cands, "ranks": ranks})
    return rows


def write_rankings(path, prompts: Sequence[str], completions_per_prompt: int, seed: int, noise: float = 0.5,
                   completions: Sequence[Sequence[str]] | None = None) -> Path:
    """JSONL of K-wise rankings (`prompt`, `completions`, `ranks`), see `make_ranking_rows`."""
    return write_jsonl(path, make_ranking_rows(prompts, completions_per_prompt, seed, noise, completions))


def bradley_terry_prob(score_i: float, score_j: float, noise: float) -> float:
    """P(i ranked above j) under the labeller: sigmoid((s_i - s_j) / noise)."""
    return 1.0 / (1.0 + math.exp(-(score_i - score_j) / noise))
