"""Rewards for PPO and GRPO: Python reward functions and a learned reward model.

Reward functions follow the convention TRL users know:
``fn(prompts, completions, **dataset_columns) -> list[float]`` (one float per completion; the
dataset's other columns arrive as keyword lists aligned with the completions, so a function
should accept ``**kwargs``). They are named on the command line as

- a built-in name: ``exact_match``, ``format``, ``gold_score`` (the arithmetic task's rewards),
- ``package.module:function``, or
- ``path/to/file.py:function``.

A function that raises, returns the wrong number of values or a non-finite value stops the run
with an error naming the function and the batch. With ``skip_bad_rewards`` the bad entries are
counted instead, the completions they touch are marked ``valid`` False and their reward is a
finite placeholder (the mean of the valid rewards); the stages leave invalid completions out of
group statistics (`rlhf.core.group_advantages(..., valid=)`), advantage whitening and the loss.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhf.data import chat_texts, tokenize_prompt_completion
from rlhf.models import check_model_path, load_reward_model, load_tokenizer, reward_scores
from rlhf.runtime import ConfigError

BUILTIN_REWARDS = {
    "exact_match": "rlhf.tasks.arithmetic:exact_match_reward",
    "format": "rlhf.tasks.arithmetic:format_reward",
    "gold_score": "rlhf.tasks.arithmetic:gold_score_reward",
}


class RewardError(ConfigError):
    """A reward function misbehaved; the message names the function and the batch.

    A ConfigError, so the command line reports it as bad input (one line, exit status 2).
    """


def load_reward_function(spec: str, option: str = "reward_funcs") -> Callable:
    """`exact_match` | `module:function` | `path/to/file.py:function` -> the callable (errors name `spec`)."""
    target = BUILTIN_REWARDS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"`{option}`: {spec!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) "
            "nor of the form module:function or path/to/file.py:function"
        )
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"`{option}`: no such file {path} (from {spec!r})")
        module_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"`{option}`: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"`{option}`: cannot import module {where!r} (from {spec!r}): {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"`{option}`: {where} has no callable named {name!r} (from {spec!r})")
    return fn


class RewardFunctions:
    """A weighted sum of reward functions, checked on every call.

    `__call__` returns (rewards (N,), per_function (N, F), valid (N,) bool); per-function values
    feed the `reward/<name>_mean|std` metrics; `skipped` counts bad values seen so far.
    """

    def __init__(self, specs: Sequence[str], weights: Sequence[float] = (), skip_bad: bool = False):
        if not specs:
            raise ConfigError("`reward_funcs`: give at least one reward function (or a reward model)")
        if weights and len(weights) != len(specs):
            raise ConfigError(f"`reward_weights`: {len(weights)} weights for {len(specs)} reward functions")
        self.names = [s.rsplit(":", 1)[-1] if s not in BUILTIN_REWARDS else s for s in specs]
        self.funcs = [load_reward_function(s) for s in specs]
        self.weights = torch.tensor(list(weights) if weights else [1.0] * len(specs), dtype=torch.float32)
        self.skip_bad = skip_bad
        self.skipped = 0

    def _call_one(self, name, fn, prompts, completions, columns, batch) -> list[float]:
        n = len(completions)
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            if self.skip_bad:
                return [math.nan] * n
            raise RewardError(f"reward function `{name}` raised on batch {batch}: {type(e).__name__}: {e}") from e
        try:
            values = [float(v) if v is not None else math.nan for v in values]
        except (TypeError, ValueError) as e:
            if self.skip_bad:
                return [math.nan] * n
            raise RewardError(f"reward function `{name}` returned non-numbers on batch {batch}: {e}") from e
        if len(values) != n:
            if self.skip_bad:
                return [math.nan] * n
            raise RewardError(f"reward function `{name}` returned {len(values)} values for {n} completions "
                              f"on batch {batch}")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad and not self.skip_bad:
            i = bad[0]
            raise RewardError(
                f"reward function `{name}` returned a non-finite value ({values[i]}) on batch {batch} "
                f"for completion {i} (prompt {prompts[i]!r}, completion {completions[i]!r}); "
                "pass --skip_bad_rewards true to skip such completions instead"
            )
        return values

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list] | None = None,
                 batch: int | str = "?") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        columns = {k: v for k, v in (columns or {}).items() if k not in ("prompt", "prompts", "completions")}
        per_function = torch.tensor([self._call_one(name, fn, prompts, completions, columns, batch)
                                     for name, fn in zip(self.names, self.funcs)], dtype=torch.float32).T  # (N, F)
        valid = torch.isfinite(per_function).all(dim=1)  # (N,)
        self.skipped += int((~valid).sum())
        rewards = (per_function.nan_to_num(0.0, 0.0, 0.0) * self.weights).sum(dim=1)  # (N,)
        if not valid.all():
            fill = rewards[valid].mean() if valid.any() else torch.tensor(0.0)
            rewards = torch.where(valid, rewards, fill)
        return rewards, per_function, valid

    def metrics(self, per_function: torch.Tensor) -> dict[str, float]:
        out = {}
        for j, name in enumerate(self.names):
            col = per_function[:, j]
            col = col[torch.isfinite(col)]
            out[f"reward/{name}_mean"] = float(col.mean()) if col.numel() else math.nan
            out[f"reward/{name}_std"] = float(col.std()) if col.numel() > 1 else 0.0
        if self.skip_bad:
            out["reward/skipped"] = self.skipped
        return out


class RewardModelScorer:
    """Scores prompt + completion texts with a learned reward model (`rlhf.models.load_reward_model`).

    The texts are re-tokenised with the reward model's own tokenizer (it may differ from the
    policy's), right-padded, with EOS appended as in reward-model training; the score is
    `rlhf.models.reward_scores` (the score head at the last real token, plus the model's own
    log-likelihood of the completion if it was trained with `logprob_coef`). `option` names the
    setting that gave `path` in errors.
    """

    def __init__(self, path: str, device=None, dtype: str = "float32", batch_size: int = 64,
                 option: str = "reward_model_path"):
        if not path:
            raise ConfigError(f"`{option}` is empty")
        check_model_path(path, option)
        try:  # a causal LM here would give random scores from a fresh head
            self.model = load_reward_model(path, dtype=dtype, trained=True).eval().requires_grad_(False)
        except ConfigError as e:
            raise ConfigError(f"`{option}`: {e}") from None
        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.batch_size = batch_size
        self.source = f"reward model {path}"

    def tokenize(self, prompt, completion) -> tuple[list[int], int]:
        """Token ids of prompt + completion in the layout of reward-model training, and the prompt's length.
        A chat prompt's completion is the assistant's answer (a string) or the messages from its turn on."""
        if isinstance(prompt, list):  # conversational: rendered by the chat template, as `rlhf reward` trains
            turn = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            head, (tail,) = chat_texts(self.tokenizer, prompt, [turn], self.source)
            return tokenize_prompt_completion(self.tokenizer, head, tail, chat=True)
        return tokenize_prompt_completion(self.tokenizer, prompt, completion, chat=False)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list) -> torch.Tensor:
        seqs = [self.tokenize(p, c) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id
        scores = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            width = max(len(s) for s, _ in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chunk],
                               device=self.device)  # (b, L) right-padded
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in chunk], device=self.device)
            prompt_lens = torch.tensor([n for _, n in chunk], device=self.device)  # (b,)
            scores.append(reward_scores(self.model, ids, mask, prompt_lens).cpu())  # (b,)
        return torch.cat(scores)  # (N,)
