"""Data: rows from a file or the hub (`loading`), checked and tokenised per format (`formats`), batched (`collate`)."""

from rlhf.data.collate import collate_rankings, collate_sft, ranking_shape, sft_shape
from rlhf.data.formats import (IGNORE_INDEX, Tokenized, chat_texts, check_prompts, pack_examples, preference_responses,
                               ranking_format, ranking_group, sft_format, sft_texts, tokenize_prompt_completion,
                               tokenize_rankings, tokenize_sft)
from rlhf.data.loading import DataError, Locator, load_rows, write_jsonl

__all__ = ["DataError", "IGNORE_INDEX", "Locator", "Tokenized", "chat_texts", "check_prompts", "collate_rankings",
           "collate_sft", "load_rows", "pack_examples", "preference_responses", "ranking_format", "ranking_group",
           "ranking_shape", "sft_format", "sft_shape", "sft_texts", "tokenize_prompt_completion", "tokenize_rankings",
           "tokenize_sft", "write_jsonl"]
