"""Data: load rows from the hub or a local file, check them, turn them into token tensors.

Formats (the TRL names):
- SFT: `text`; `prompt` + `completion` (strings, or lists of chat messages); `messages` (a chat whose
  last message is the assistant's answer). Chat rows go through the tokenizer's chat template.
- Rewards: pairwise `prompt` + `chosen` + `rejected`, or K-wise `prompt` + `completions` (K strings)
  + `ranks` (K integers, 0 = best, ties allowed). Pairwise rows become K = 2 rankings.

Length policy: an example (an SFT row, or a whole reward group) longer than `max_length` tokens is
dropped, never truncated: a cut answer would teach a wrong answer. Callers report the count.
Every problem found in a row raises `DataError` naming the file and line (JSONL) or row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.runtime import ConfigError, meant_as_local_path

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ConfigError):
    """Bad input data; the message names the file and the line / row / column."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class Locator:
    """Names where row i came from: `file: line N` for JSONL files, `file: row i` otherwise."""

    def __init__(self, source: str):
        self.source, self._lines = source, None
        path = Path(source)
        if path.is_file() and path.suffix == ".jsonl":
            with open(path) as fh:
                self._lines = [n for n, line in enumerate(fh, start=1) if line.strip()]

    def __call__(self, i: int) -> str:
        if self._lines is not None and i < len(self._lines):
            return f"{self.source}: line {self._lines[i]}"
        return f"{self.source}: row {i}"


def _json_kind(value) -> str | None:
    """A JSON value's type as one arrow column holds it: ints and floats mix; None and [] fit any column."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    inner = {_json_kind(v) for v in value} - {None}
    return "list of " + " and ".join(sorted(inner)) if inner else None


def _json_error_line(path: Path, columns: Sequence[str] | None = None) -> str | None:
    """The first line of a JSONL file that is not a JSON object, or where a field (of `columns`) changes type."""
    types: dict[str, str] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}: line {n}: not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"{path}: line {n}: expected a JSON object, got {type(row).__name__}"
            for key, value in row.items():
                kind = _json_kind(value)
                if kind is None or (columns is not None and key not in columns):
                    continue
                if " and " in kind:
                    return f"{path}: line {n}: column `{key}` is a {kind} (a list holds one type)"
                if types.setdefault(key, kind) != kind:
                    return f"{path}: line {n}: column `{key}` is {_a(kind)} here but {_a(types[key])} on earlier lines"
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _mixed_columns(features) -> list[str]:
    """Columns `datasets` stored as `Json`: values of different types, which it no longer tells apart
    (the string "2" reads back as the number 2), so a check on them would blame the wrong line."""
    import datasets

    def mixed(f) -> bool:
        if isinstance(f, datasets.Json):
            return True
        if isinstance(f, dict):
            return any(map(mixed, f.values()))
        return hasattr(f, "feature") and mixed(f.feature)  # List / Sequence / LargeList

    return [c for c, f in features.items() if mixed(f)]


def load_rows(dataset_name: str, split: str = "train", required: Sequence[str] = ()):
    """A `datasets.Dataset` from a hub name or a local json / jsonl / parquet / csv file or directory."""
    import datasets

    path = Path(dataset_name)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small file is noise next to the training bar
    try:
        if path.is_file():
            if path.suffix not in _LOCAL_FORMATS:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_LOCAL_FORMATS)}")
            kind = _LOCAL_FORMATS[path.suffix]
            rows = datasets.load_dataset(kind, data_files=str(path), split="train")
            if kind == "csv":  # CSV cells are text: type inference would turn a completion "42" into the integer 42
                rows = rows.cast(datasets.Features({c: datasets.Value("string") for c in rows.column_names}))
        elif path.is_dir():
            rows = datasets.load_dataset(str(path), split=split)
        elif Path(dataset_name).suffix in _LOCAL_FORMATS or meant_as_local_path(dataset_name):
            raise DataError(f"no such data file: {dataset_name}")  # not a hub name: say so, not "cannot reach the hub"
        else:
            rows = datasets.load_dataset(dataset_name, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - arrow / datasets errors are re-raised naming the file (and line)
        located = _json_error_line(path) if path.is_file() and path.suffix in (".json", ".jsonl") else None
        raise DataError(located or f"{dataset_name}: cannot load split {split!r}: {type(e).__name__}: {e}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    mixed = _mixed_columns(rows.features) if hasattr(datasets, "Json") else []
    if mixed:
        located = _json_error_line(path, mixed) if path.is_file() and path.suffix == ".jsonl" else None
        raise DataError(located or f"{dataset_name}: column `{mixed[0]}` holds values of different types in different rows")
    missing = [c for c in required if c not in rows.column_names]
    if missing:
        raise DataError(f"{dataset_name}: missing column `{missing[0]}` (has: {', '.join(rows.column_names)})")
    return rows


def check_prompts(rows, source: str) -> None:
    """PPO / GRPO prompts: each a non-empty string or a non-empty list of chat messages."""
    where = Locator(source)
    for i, prompt in enumerate(rows["prompt"]):
        if not (isinstance(prompt, str) and prompt.strip() or _is_chat(prompt) and prompt):
            raise DataError(f"{where(i)}: empty `prompt` (or not a string / list of {{role, content}} messages): {prompt!r}")


# ---------------------------------------------------------------------------------------------
# SFT: formats, tokenisation, collation
# ---------------------------------------------------------------------------------------------

SFT_FORMATS = ("messages", "prompt_completion", "text")


def sft_format(column_names: Sequence[str], source: str) -> str:
    cols = set(column_names)
    if "messages" in cols:
        return "messages"
    if "prompt" in cols or "completion" in cols:
        for c in ("prompt", "completion"):
            if c not in cols:
                raise DataError(f"{source}: missing column `{c}` (prompt/completion format needs both)")
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(f"{source}: missing column `text` (SFT data needs `text`, `prompt` + `completion`, or `messages`; "
                    f"has: {', '.join(column_names)})")


def _is_chat(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _chat_split(tokenizer, prompt_msgs: list, completion_msgs: list, where: str) -> tuple[str, str]:
    """Render a chat; the prompt is everything up to the assistant's answer (generation prompt included)."""
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: chat messages given but the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
    return prompt, full[len(prompt):]


def sft_texts(row: dict, fmt: str, tokenizer, where: str) -> tuple[str, str, bool]:
    """(prompt, completion, rendered by a chat template) of one SFT row; empty parts are errors."""
    if fmt == "text":
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty or non-string `text`")
        return "", text, False
    if fmt == "messages":
        msgs = row["messages"]
        if not _is_chat(msgs) or not msgs:
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"]).strip():
            raise DataError(f"{where}: the last message must be a non-empty assistant message")
        return (*_chat_split(tokenizer, msgs[:-1], msgs[-1:], where), True)
    prompt, completion = row["prompt"], row["completion"]
    if _is_chat(prompt) or _is_chat(completion):
        if not (_is_chat(prompt) and _is_chat(completion)) or not prompt or not completion:
            raise DataError(f"{where}: conversational `prompt` and `completion` must both be non-empty message lists")
        return (*_chat_split(tokenizer, prompt, completion, where), True)
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: empty or non-string `{name}`")
    return prompt, completion, False


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, chat: bool) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ EOS), and the number of prompt tokens.

    Plain text: the tokenizer's special tokens (e.g. BOS) go before the prompt and EOS after the
    completion. Chat-rendered text already holds them, so none are added.
    """
    if chat:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else tokenizer("")["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
            completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


@dataclass
class Tokenized:
    examples: list[dict]  # each {"input_ids": list[int], "labels": list[int]}
    dropped_too_long: int
    dropped_all_ties: int = 0  # rankings whose responses all share one rank: no preference to learn


def tokenize_sft(rows, tokenizer, max_length: int, completion_only_loss: bool = True, source: str = "data") -> Tokenized:
    """Token ids and labels (-100 on prompt tokens when `completion_only_loss`); too-long rows dropped and counted."""
    fmt = sft_format(rows.column_names, source)
    where = Locator(source)
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        prompt, completion, chat = sft_texts(row, fmt, tokenizer, where(i))
        ids, n_prompt = tokenize_prompt_completion(tokenizer, prompt, completion, chat)
        if len(ids) > max_length:
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] if completion_only_loss else list(ids)
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{source}: no usable example ({dropped} longer than max_length={max_length} tokens)")
    return Tokenized(examples, dropped)


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut them into blocks of exactly `max_length` tokens (the tail is dropped).

    Each example keeps its own labels; attention spans document boundaries (no per-document masks),
    the usual trade of packing for short documents.
    """
    ids, labels = [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids) - max_length + 1, max_length)]


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


# ---------------------------------------------------------------------------------------------
# Rewards: pairwise / K-wise rankings
# ---------------------------------------------------------------------------------------------


def ranking_format(column_names: Sequence[str], source: str) -> str:
    cols = set(column_names)
    if "completions" in cols or "ranks" in cols:
        need = ("prompt", "completions", "ranks")
        fmt = "rankings"
    else:
        need = ("prompt", "chosen", "rejected")
        fmt = "pairwise"
    for c in need:
        if c not in cols:
            raise DataError(f"{source}: missing column `{c}` ({fmt} data needs {', '.join(need)})")
    return fmt


def ranking_group(row: dict, fmt: str, where: str) -> tuple[str, list[str], list[int]]:
    """(prompt, K completions, K ranks) of one row, checked."""
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: empty or non-string `prompt`")
    if fmt == "pairwise":
        completions, ranks = [row["chosen"], row["rejected"]], [0, 1]
    else:
        completions, ranks = row["completions"], row["ranks"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: `completions` must be a list of at least 2 strings")
        # Arrow turns a column's ints into floats when any row has a float, so 1.0 counts as 1.
        if (not isinstance(ranks, list) or len(ranks) != len(completions)
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and float(r).is_integer() and r >= 0
                           for r in ranks)):
            raise DataError(f"{where}: `ranks` must be a list of {len(completions)} non-negative integers "
                            f"(one per completion, 0 = best); got {ranks!r}")
        ranks = [int(r) for r in ranks]
    for c in completions:
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"{where}: empty or non-string completion {c!r}")
    if fmt == "pairwise" and completions[0].strip() == completions[1].strip():
        raise DataError(f"{where}: `chosen` and `rejected` are the same response {completions[0]!r}")
    return prompt, list(completions), list(ranks)


def tokenize_rankings(rows, tokenizer, max_length: int, source: str = "data") -> Tokenized:
    """Each row -> {"input_ids": K lists, "ranks": K ints}; a group with any response over `max_length` is dropped."""
    fmt = ranking_format(rows.column_names, source)
    where = Locator(source)
    examples, dropped, ties = [], 0, 0
    for i, row in enumerate(rows):
        prompt, completions, ranks = ranking_group(row, fmt, where(i))
        if len(set(ranks)) == 1:  # ties are skipped by the loss: such a row would only dilute the batch
            ties += 1
            continue
        seqs = [tokenize_prompt_completion(tokenizer, prompt, c, chat=False)[0] for c in completions]
        if max(map(len, seqs)) > max_length:
            dropped += 1
            continue
        examples.append({"input_ids": seqs, "ranks": ranks})
    if not examples:
        raise DataError(f"{source}: no usable ranking ({dropped} longer than max_length={max_length} tokens, "
                        f"{ties} with all responses tied)")
    return Tokenized(examples, dropped, ties)


def collate_rankings(groups: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Flatten B groups of up to K responses into one (B*K, T) batch: every response passes the model once.

    ranks (B, K) holds -1 where a group has fewer than K responses (the row `valid` marks real ones);
    their input rows are a lone pad token and their scores are ignored by the ranking loss.
    """
    k = max(len(g["input_ids"]) for g in groups)
    seqs, ranks = [], torch.full((len(groups), k), -1, dtype=torch.long)  # (B, K)
    for b, g in enumerate(groups):
        seqs += g["input_ids"] + [[pad_token_id]] * (k - len(g["input_ids"]))
        ranks[b, : len(g["ranks"])] = torch.tensor(g["ranks"])
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (B*K, T)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "ranks": ranks}


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSONL atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["DataError", "IGNORE_INDEX", "Locator", "Tokenized", "check_prompts", "collate_rankings", "collate_sft",
           "load_rows", "pack_examples", "ranking_format", "ranking_group", "sft_format", "sft_texts",
           "tokenize_prompt_completion", "tokenize_rankings", "tokenize_sft", "write_jsonl"]
