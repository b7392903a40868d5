"""Rows of each format, checked, to token ids: SFT examples with labels, reward rankings, packing.

Formats (the TRL names):
- SFT: `text`; `prompt` + `completion` (strings, or lists of chat messages); `messages` (a chat whose
  last message is the assistant's answer). Chat rows go through the tokenizer's chat template.
- Rewards and DPO: pairwise `prompt` + `chosen` + `rejected`, or K-wise `prompt` + `completions` (K responses)
  + `ranks` (K integers, 0 = best, ties allowed). Pairwise rows become K = 2 rankings. Plain strings, or a chat
  (`preference_responses`): a prompt of messages with string or message responses, or whole conversations
  without a `prompt` (their shared first messages are the prompt).
- PPO / GRPO prompts: `prompt`, a string or a list of chat messages.

Length policy: an example (an SFT row, or a whole reward group) longer than `max_length` tokens is
dropped, never truncated: a cut answer would teach a wrong answer; the count is printed (`notice`) and
callers put it in their summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlhf.data.loading import DataError, Locator
from rlhf.runtime import notice

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def _is_chat(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def check_prompts(rows, source: str) -> None:
    """PPO / GRPO prompts: each a non-empty string or a non-empty list of chat messages."""
    where = Locator(source)
    for i, prompt in enumerate(rows["prompt"]):
        if not (isinstance(prompt, str) and prompt.strip() or _is_chat(prompt) and prompt):
            raise DataError(f"{where(i)}: empty `prompt` (or not a string / list of {{role, content}} messages): "
                            f"{prompt!r}")


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


def chat_texts(tokenizer, prompt_msgs: list, responses: list[list], where: str) -> tuple[str, list[str]]:
    """A chat prompt and each response (messages after it) rendered by the tokenizer's chat template: the prompt
    with the generation prompt, and each response as what the whole conversation adds to it."""
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: chat messages given but the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = tokenizer.apply_chat_template(prompt_msgs + response, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
        texts.append(full[len(prompt):])
    return prompt, texts


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
        prompt, (completion,) = chat_texts(tokenizer, msgs[:-1], [msgs[-1:]], where)
        return prompt, completion, True
    prompt, completion = row["prompt"], row["completion"]
    if _is_chat(prompt) or _is_chat(completion):
        if not (_is_chat(prompt) and _is_chat(completion)) or not prompt or not completion:
            raise DataError(f"{where}: conversational `prompt` and `completion` must both be non-empty message lists")
        prompt, (completion,) = chat_texts(tokenizer, prompt, [completion], where)
        return prompt, completion, True
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: empty or non-string `{name}`")
    return prompt, completion, False


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Each text's token ids, as `tokenizer(text)["input_ids"]` gives them.

    A fast tokenizer's Rust backend is called directly: transformers' wrapper around it costs about
    5x the encoding itself per text (most of the data preparation of `rlhf dpo` / `rlhf reward` on
    short texts). Not when the backend carries its own truncation or fixed-length padding, which the
    wrapper would switch off for the call (padding to the longest of one text changes nothing).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or (backend.padding or {}).get("length") is not None:
        return [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    return [backend.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, chat: bool) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ EOS), and the number of prompt tokens.

    Plain text: the tokenizer's special tokens (e.g. BOS) go before the prompt and EOS after the
    completion. Chat-rendered text already holds them, so none are added.
    """
    return tokenize_prompt_completions(tokenizer, [prompt], [completion], chat)[0]


def tokenize_prompt_completions(tokenizer, prompts: list[str], completions: list[str],
                                chat: bool) -> list[tuple[list[int], int]]:
    """`tokenize_prompt_completion` of each (prompt, completion) pair."""
    completion_ids = token_ids(tokenizer, completions, add_special_tokens=False)
    unique = list(dict.fromkeys(prompts))  # a ranking's K rows share one prompt: encode it once
    encoded = dict(zip(unique, token_ids(tokenizer, [p or "" for p in unique], add_special_tokens=not chat)))
    prompt_ids = [encoded[p] for p in prompts]
    eos = tokenizer.eos_token_id
    if not chat and eos is not None:
        completion_ids = [c if c and c[-1] == eos else c + [eos] for c in completion_ids]
    return [(p + c, len(p)) for p, c in zip(prompt_ids, completion_ids)]


@dataclass
class Tokenized:
    examples: list[dict]  # each {"input_ids": list[int], "labels": list[int]}
    dropped_too_long: int
    dropped_all_ties: int = 0  # rankings whose responses all share one rank: no preference to learn


def tokenize_sft(rows, tokenizer, max_length: int, completion_only_loss: bool = True,
                 source: str = "data") -> Tokenized:
    """Token ids and labels (-100 on prompt tokens when `completion_only_loss`); too-long rows dropped and counted."""
    fmt = sft_format(rows.column_names, source)
    where = Locator(source)
    examples, dropped = [], 0
    for i, row in enumerate(rows.to_list()):  # one conversion of the table, not one per row
        prompt, completion, chat = sft_texts(row, fmt, tokenizer, where(i))
        ids, n_prompt = tokenize_prompt_completion(tokenizer, prompt, completion, chat)
        if len(ids) > max_length:
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] if completion_only_loss else list(ids)
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{source}: no usable example ({dropped} longer than max_length={max_length} tokens)")
    if dropped:
        notice(f"{source}: dropped {dropped} of {len(rows)} examples longer than max_length={max_length} tokens "
               "(--max_length keeps them)")
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


def ranking_format(column_names: Sequence[str], source: str) -> str:
    cols = set(column_names)
    fmt, need = ("rankings", ("completions", "ranks")) if "completions" in cols or "ranks" in cols else (
        "pairwise", ("chosen", "rejected"))
    for c in need:
        if c not in cols:
            raise DataError(f"{source}: missing column `{c}` ({fmt} data needs {', '.join(need)} and a `prompt`, "
                            "which only whole conversations may leave out)")
    return fmt


def _message_key(messages: list) -> list[tuple]:
    return [(m["role"], m["content"]) for m in messages]


def preference_responses(prompt, responses: list, where: str, names: str = "completions") -> tuple:
    """(prompt, responses) of one row of preference data, checked: a string prompt and string responses, or a chat.

    A chat is a prompt of messages with responses that are strings (each the assistant's answer) or lists of
    messages after the prompt; or, with `prompt` absent or a string, responses that are whole conversations
    (TRL's implicit prompt): the prompt is then the first messages they all share. Chat responses come back as
    message lists that start with the assistant's turn. `names`: the column(s) the responses come from, for errors.
    """
    chat_prompt = _is_chat(prompt) and bool(prompt)
    if any(isinstance(r, list) for r in responses) or chat_prompt:
        if not chat_prompt:  # the prompt is what every conversation starts with
            if not all(_is_chat(r) for r in responses):
                raise DataError(f"{where}: `{names}` mix chat messages with other values")
            keys = [_message_key(r) for r in responses]
            n = 0
            while all(len(k) > n and k[n] == keys[0][n] for k in keys):
                n += 1
            if n == 0:
                raise DataError(f"{where}: `{names}` are conversations with no first message in common and `prompt` "
                                "is not a list of messages: give the prompt as messages, or whole conversations")
            if any(len(k) == n for k in keys):
                raise DataError(f"{where}: a response in `{names}` has no messages after those all of them share "
                                "(the same conversation twice?)")
            prompt, responses = responses[0][:n], [r[n:] for r in responses]
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
        for r in responses:
            if not _is_chat(r) or not r or r[0]["role"] != "assistant" or not all(
                    isinstance(m["content"], str) and m["content"].strip() for m in r):
                raise DataError(f"{where}: every response in `{names}` must be non-empty chat messages from the "
                                f"assistant's turn on (after the prompt); got {r!r}")
        return prompt, responses
    if prompt is None:
        raise DataError(f"{where}: missing `prompt` (only responses that are whole conversations may leave it out)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: empty or non-string `prompt`")
    for r in responses:
        if not isinstance(r, str) or not r.strip():
            raise DataError(f"{where}: empty or non-string completion {r!r} in `{names}`")
    return prompt, list(responses)


def ranking_group(row: dict, fmt: str, where: str) -> tuple:
    """(prompt, K responses, K ranks) of one row, checked (`preference_responses`: plain text or a chat)."""
    if fmt == "pairwise":
        completions, ranks, names = [row["chosen"], row["rejected"]], [0, 1], "chosen` / `rejected"
    else:
        completions, ranks, names = row["completions"], row["ranks"], "completions"
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: `completions` must be a list of at least 2 responses")
        # Arrow turns a column's ints into floats when any row has a float, so 1.0 counts as 1.
        if (not isinstance(ranks, list) or len(ranks) != len(completions)
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and float(r).is_integer() and r >= 0
                           for r in ranks)):
            raise DataError(f"{where}: `ranks` must be a list of {len(completions)} non-negative integers "
                            f"(one per completion, 0 = best); got {ranks!r}")
        ranks = [int(r) for r in ranks]
    prompt, completions = preference_responses(row.get("prompt"), completions, where, names)
    if fmt == "pairwise" and (completions[0].strip() == completions[1].strip() if isinstance(prompt, str)
                              else _message_key(completions[0]) == _message_key(completions[1])):
        raise DataError(f"{where}: `chosen` and `rejected` are the same response {completions[0]!r}")
    return prompt, completions, list(ranks)


def tokenize_rankings(rows, tokenizer, max_length: int, source: str = "data") -> Tokenized:
    """Each row -> {"input_ids": K lists, "ranks": K ints, "prompt_len": tokens of the prompt (the same in each)};
    a group with any response over `max_length` is dropped. A chat row's prompt and responses go through the
    tokenizer's chat template (`chat_texts`), which writes the special tokens itself."""
    fmt = ranking_format(rows.column_names, source)
    where = Locator(source)
    checked = [(i, *ranking_group(row, fmt, where(i))) for i, row in enumerate(rows.to_list())]  # one conversion
    # ties are skipped by the loss: a row whose responses all tie would only dilute the batch
    kept = [(i, prompt, completions, ranks) for i, prompt, completions, ranks in checked if len(set(ranks)) > 1]
    ties = len(checked) - len(kept)
    prompts, responses = [], []  # one entry per response
    for i, prompt, completions, _ in kept:
        if not isinstance(prompt, str):
            prompt, completions = chat_texts(tokenizer, prompt, completions, where(i))
        prompts += [prompt] * len(completions)
        responses += completions
    chat = bool(kept) and not isinstance(kept[0][1], str)  # all rows or none: a column holds one type
    tokenized = iter(tokenize_prompt_completions(tokenizer, prompts, responses, chat))
    examples, dropped = [], 0
    for _, _, completions, ranks in kept:
        group = [next(tokenized) for _ in completions]
        seqs = [ids for ids, _ in group]
        if max(map(len, seqs)) > max_length:
            dropped += 1
            continue
        examples.append({"input_ids": seqs, "ranks": ranks, "prompt_len": group[0][1]})
    if not examples:
        raise DataError(f"{source}: no usable ranking ({dropped} longer than max_length={max_length} tokens, "
                        f"{ties} with all responses tied)")
    if dropped or ties:
        why = [f"{dropped} longer than max_length={max_length} tokens (--max_length keeps them)"] * bool(dropped) + [
            f"{ties} whose responses all tie"] * bool(ties)
        notice(f"{source}: dropped {dropped + ties} of {len(checked)} rankings: {', '.join(why)}")
    return Tokenized(examples, dropped, ties)
