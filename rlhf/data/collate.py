"""Batches of token ids: right-padded tensors for SFT, flattened groups of responses for reward rankings; and for
each, what it pads a batch to (a sort key that puts like examples together, `rlhf.training.scoring_batches`)."""

from __future__ import annotations

import torch

from rlhf.data.formats import IGNORE_INDEX


def collate_sft(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_shape(example: dict) -> tuple[int]:
    """What `collate_sft` pads a batch to, for one example: its length."""
    return (len(example["input_ids"]),)


def collate_rankings(groups: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Flatten B groups of up to K responses into one (B*K, T) batch: every response passes the model once.

    ranks (B, K) holds -1 where a group has fewer than K responses (the row `valid` marks real ones);
    their input rows are a lone pad token and their scores are ignored by the ranking loss.
    """
    k = max(len(g["input_ids"]) for g in groups)
    seqs, ranks = [], torch.full((len(groups), k), -1, dtype=torch.long)  # (B, K)
    prompt_lens = torch.ones(len(groups) * k, dtype=torch.long)  # (B*K,)
    for b, g in enumerate(groups):
        seqs += g["input_ids"] + [[pad_token_id]] * (k - len(g["input_ids"]))
        ranks[b, : len(g["ranks"])] = torch.tensor(g["ranks"])
        prompt_lens[b * k:(b + 1) * k] = g["prompt_len"]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (B*K, T)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "ranks": ranks, "prompt_lens": prompt_lens}


def ranking_shape(group: dict) -> tuple[int, int]:
    """What `collate_rankings` pads a batch to, for one group: its number of responses and its longest sequence."""
    return len(group["input_ids"]), max(map(len, group["input_ids"]))
