"""Rollouts for PPO and GRPO: sample completions with a KV cache, and the log-probs of what was sampled.

Two functions that must agree to floating-point tolerance, so the PPO/GRPO ratio is exactly 1 at
the first step (a known pain in peers: padding and temperature mismatches make it drift):

- `generate(...)`: an explicit sampling loop over the model's KV cache (one prefill, then one
  token per step) with temperature, top-k, top-p and stop at EOS. It returns the log-probs of the
  sampled tokens as it goes (no second pass over the vocabulary) and stops as soon as every row
  has emitted EOS; on CPU it is about as fast as `model.generate` for tiny models.
- `batch_logprobs(...)`: the training forward pass over the same left-padded prompt + right-padded
  completion batch, with the same position ids and the same temperature (optionally encoding each
  prompt once for a group of completions that share it); `grouped_logprobs(...)` the same for K
  completions per prompt in one pass (DPO's pairs and rankings).

Conventions shared by both:
- prompts are LEFT-padded, so every completion starts at column P = prompt width; position ids come
  from the attention mask (cumsum - 1), so a left-padded prompt sees the same positions as alone;
- log-probs are of the temperature-T distribution softmax(logits / T), *before* top-k / top-p
  filtering (as TRL and OpenRLHF do): the training pass cannot see the filter, and with
  top_k = 0 and top_p = 1 (the defaults) sampling is exactly on-policy;
- the completion mask covers the tokens up to and including EOS; after EOS the ids are pad;
- logits are computed only for the completion columns (`logits_to_keep`) and turned into
  log-probs by `rlhf.core.logprobs_from_logits` (gather - logsumexp), so no full-vocabulary
  log-softmax over the prompt is ever materialised.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch
from transformers import DynamicCache

from rlhf.core import entropy_from_logits, log_sum_sq_probs, logprobs_from_logits
from rlhf.data import check_prompts, load_rows
from rlhf.distributed import gathered_for_generation
from rlhf.models import disable_dropout, load_tokenizer
from rlhf.rewards import RewardFunctions, RewardModelScorer
from rlhf.runtime import command_name, resolve_checkpoint
from rlhf.tasks.arithmetic import evaluate_policy, make_prompts


@dataclasses.dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T) pad after EOS
    completion_mask: torch.Tensor  # (B, T) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, T) float32, log pi_T(token), 0 on padding
    is_truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    sampler_logprobs: torch.Tensor | None = None  # (B, T) a vLLM engine's own log-probs (rlhf.vllm_engine)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)

    def select(self, rows) -> Rollout:
        """The rollout of the given rows (an index tensor or a bool mask over B)."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                          for f in dataclasses.fields(Rollout)})


def cat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of different prompt / completion widths as one: prompts left-padded and completions
    right-padded to the widest (the conventions above, so positions and log-probs do not change)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)

    def pad(x, width, value, left=False):
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    fields = {
        "prompt_ids": [pad(r.prompt_ids, P, pad_token_id, left=True) for r in parts],
        "prompt_mask": [pad(r.prompt_mask, P, 0, left=True) for r in parts],
        "completion_ids": [pad(r.completion_ids, T, pad_token_id) for r in parts],
        "completion_mask": [pad(r.completion_mask, T, 0) for r in parts],
        "logprobs": [pad(r.logprobs, T, 0.0) for r in parts],
        "is_truncated": [r.is_truncated for r in parts],
    }
    if parts[0].sampler_logprobs is not None:
        fields["sampler_logprobs"] = [pad(r.sampler_logprobs, T, 0.0) for r in parts]
    return Rollout(**{k: torch.cat(v) for k, v in fields.items()})


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _base_model(model):
    while hasattr(model, "get_base_model") or hasattr(model, "module"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def _cache_kwarg(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(_base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: excluded logits become -inf. (B, V) -> (B, V)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    num_return_sequences: int = 1,
    greedy_last: bool = False,
) -> Rollout:
    """Sample up to `max_new_tokens` per prompt with the model's KV cache; stop a row at EOS.

    With `num_return_sequences` = G, each prompt is encoded once and its KV cache copied G times
    (GRPO's groups share the prompt: the prefill is not repeated G times).

    Shapes: prompt_ids, prompt_mask (B, P), left-padded; returns a `Rollout` with (B * G, T)
    tensors, prompt-major (the G samples of a prompt are consecutive), T <= max_new_tokens (the
    loop stops as soon as every row has emitted EOS).
    `greedy` takes the argmax (log-probs are still those of the temperature-T distribution);
    `greedy_last` does so only for the last of each prompt's rows (ReMax's greedy baseline, decoded
    in the same pass as the samples).
    """
    # inference_mode: no autograd bookkeeping at all, faster than no_grad for tiny models. But under autocast,
    # no_grad: autocast reuses its bfloat16 copies of the weights over the decode steps only outside inference mode
    # (inside it every step casts every weight again: a third of a bf16 rollout's time on a 34M model).
    autocast = torch.is_autocast_enabled(prompt_ids.device.type)
    with torch.no_grad() if autocast else torch.inference_mode():
        rollout = _sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                          top_k, top_p, greedy, generator, num_return_sequences, greedy_last)
    # inference tensors cannot enter autograd (the training pass embeds these ids): plain copies
    return Rollout(**{f.name: getattr(rollout, f.name).clone() for f in dataclasses.fields(Rollout)
                      if getattr(rollout, f.name) is not None})


def _sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
            greedy, generator, num_return_sequences, greedy_last=False) -> Rollout:
    was_training = model.training
    model.eval()
    device = prompt_ids.device
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
    attention_mask = prompt_mask.long()
    position_ids = position_ids_from_mask(attention_mask)
    cache = DynamicCache(config=_base_model(model).config)
    cache_name = _cache_kwarg(model)
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{cache_name: cache})
    logits = out.logits[:, -1, :]  # (B, V)
    if num_return_sequences > 1:
        g = num_return_sequences
        cache.batch_repeat_interleave(g)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
        attention_mask, position_ids = attention_mask.repeat_interleave(g, 0), position_ids.repeat_interleave(g, 0)
        logits = logits.repeat_interleave(g, 0)  # (B * G, V)
    batch = prompt_ids.shape[0]
    greedy_rows = None
    if greedy_last and not greedy:
        greedy_rows = torch.arange(batch, device=device) % num_return_sequences == num_return_sequences - 1
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for step in range(max_new_tokens):
        logits = logits.float() / temperature  # (B, V)
        if greedy:
            token = logits.argmax(-1)  # (B,)
        else:
            probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            if greedy_rows is not None:
                token = torch.where(greedy_rows, logits.argmax(-1), token)
        logp = logprobs_from_logits(logits, token)  # (B,)
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        masks.append(alive.long())
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                       use_cache=True, **{cache_name: cache}).logits[:, -1, :]
        next_position = next_position + 1
    model.train(was_training)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.long(),
        completion_ids=torch.stack(tokens, dim=1),  # (B, T)
        completion_mask=torch.stack(masks, dim=1),  # (B, T)
        logprobs=torch.stack(logps, dim=1),  # (B, T)
        is_truncated=~finished,
    )


def batch_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    temperature: float = 1.0,
    share_prompts: bool = False,
    with_entropy: bool = False,
    with_log_sum_sq: bool = False,
):
    """Per-token log-probs of the completion tokens `input_ids[:, completion_start:]` under softmax(logits / T).

    The training-side twin of `generate`: same position ids (from the mask), same temperature.
    Only the logits that predict completion tokens are computed (`logits_to_keep`), so the prompt
    never goes through the LM head.

    `share_prompts`: consecutive rows with the same prompt (GRPO's groups) encode that prompt once;
    its KV cache is indexed out to its rows and only the completion tokens go through the model
    again. Same values and gradients (to float tolerance), a prompt's cost paid once per group
    instead of G times. Needs a model that accepts a KV cache in training (no gradient checkpointing).

    `with_entropy`: also the entropy of each position's temperature-T distribution (for an entropy
    bonus), returned as (logp, entropy); `with_log_sum_sq`: also its log sum_v p_v^2 (WPO's weights,
    `rlhf.core.log_sum_sq_probs`), after the entropy if both.

    Shapes: input_ids, attention_mask (B, P + T), completion_start = P; returns (B, T) float32.
    """
    n_completion = input_ids.shape[1] - completion_start
    position_ids = position_ids_from_mask(attention_mask)
    if not share_prompts:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=n_completion + 1)
        logits = out.logits[:, :-1, :]  # (B, T, V): position t predicts token t + 1
    else:
        prompt_ids, prompt_mask = input_ids[:, :completion_start], attention_mask[:, :completion_start]
        starts_group = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device)  # (B,)
        starts_group[1:] = ((prompt_ids[1:] != prompt_ids[:-1]) | (prompt_mask[1:] != prompt_mask[:-1])).any(1)
        group = starts_group.long().cumsum(0) - 1  # (B,) row -> its distinct prompt
        first = starts_group.nonzero().squeeze(1)  # (U,) one row per distinct prompt
        cache, cache_name = DynamicCache(config=_base_model(model).config), _cache_kwarg(model)
        prefix = model(input_ids=prompt_ids[first], attention_mask=prompt_mask[first],
                       position_ids=position_ids[first, :completion_start], use_cache=True, logits_to_keep=1,
                       **{cache_name: cache})
        cache.batch_select_indices(group)  # (U, ...) -> (B, ...), differentiable indexing
        out = model(input_ids=input_ids[:, completion_start:], attention_mask=attention_mask,
                    position_ids=position_ids[:, completion_start:], use_cache=True, logits_to_keep=n_completion,
                    **{cache_name: cache})
        # the prompt's last position predicts completion token 0; completion position t predicts t + 1
        logits = torch.cat([prefix.logits[group, -1:], out.logits[:, :-1]], dim=1)  # (B, T, V)
    logits = logits.float() / temperature
    logp = logprobs_from_logits(logits, input_ids[:, completion_start:])  # (B, T)
    extras = []  # only what is asked for: each is a pass over the vocabulary
    if with_entropy:
        extras.append(entropy_from_logits(logits))
    if with_log_sum_sq:
        extras.append(log_sum_sq_probs(logits))
    return (logp, *extras) if extras else logp


def grouped_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    with_log_sum_sq: bool = False,
):
    """`batch_logprobs` of K completions per prompt (temperature 1) in ONE forward pass, each prompt encoded once.

    Each prompt and its K completions are laid out in one row, prompt | completion 1 | ... | completion K
    (each without its last token, whose logits predict nothing scored), under an attention mask that lets
    a completion see its prompt and its own earlier tokens only, with the positions it would have after
    the prompt alone. So its logits are those of prompt + completion forwarded in full (to float
    tolerance), while the prompt's cost is paid once and, unlike the KV-cache path of
    `batch_logprobs(share_prompts=True)`, in one model call (on a tiny model a call's fixed cost
    is most of a short batch) and without a cache (so gradient checkpointing works). Attention over the
    row grows with K x completion length: meant for DPO's pairs and rankings, not for long rollouts.

    `with_log_sum_sq`: also each position's log sum_v p_v^2, returned as (logp, log_sum_sq) (as `batch_logprobs`).

    Shapes: prompt_ids, prompt_mask (U, P) left-padded; completion_ids, completion_mask (U*K, R), the K
    completions of a prompt consecutive, right-padded; returns (U*K, R) float32 (garbage where the mask is 0).
    """
    (u, p), r = prompt_ids.shape, completion_ids.shape[1]
    k, n = completion_ids.shape[0] // u, r - 1  # n: input columns per completion (its last token predicts nothing)
    device = prompt_ids.device
    input_ids = torch.cat([prompt_ids, completion_ids[:, :n].reshape(u, k * n)], 1)  # (U, L), L = P + K*(R-1)
    real = torch.cat([prompt_mask, completion_mask[:, :n].reshape(u, k * n)], 1).bool()  # (U, L)
    prompt_len = prompt_mask.sum(1, keepdim=True)  # (U, 1)
    offset = torch.arange(r, device=device)  # (R,)
    position_ids = torch.cat([position_ids_from_mask(prompt_mask), (prompt_len + offset[:n]).repeat(1, k)], 1)
    segment = torch.cat([torch.zeros(p, dtype=torch.long, device=device),
                         torch.arange(1, k + 1, device=device).repeat_interleave(n)])  # (L,): 0 prompt, i completion i
    col = torch.arange(p + k * n, device=device)
    allowed = (col[None] <= col[:, None]) & ((segment[None] == 0) | (segment[None] == segment[:, None]))  # (L, L)
    # every query sees at least itself: a padding position attending to nothing would give NaN, which
    # masked-out keys still carry into real positions as 0 * NaN
    attention = (allowed & real[:, None, :]) | torch.eye(p + k * n, dtype=torch.bool, device=device)  # (U, L, L)
    logits = model(input_ids=input_ids, attention_mask=attention[:, None], position_ids=position_ids,
                   use_cache=False, logits_to_keep=k * n + 1).logits  # (U, K*n + 1, V): columns P-1 .. L-1
    # completion i's token 0 is predicted by the prompt's last column (kept index 0), token j > 0 by its
    # own token j - 1 (kept index 1 + i*n + j - 1)
    index = (torch.arange(k, device=device)[:, None] * n + offset) * (offset > 0)  # (K, R)
    logits = logits[:, index.view(-1)].reshape(u * k, r, -1)  # (U*K, R, V)
    logp = logprobs_from_logits(logits, completion_ids)
    return (logp, log_sum_sq_probs(logits)) if with_log_sum_sq else logp


def tokenize_prompts(tokenizer, prompts: list, device=None, max_prompt_length: int | None = None):
    """Left-padded prompt ids and mask. Conversational prompts (lists of {role, content}) go through
    the tokenizer's chat template with the generation prompt; plain strings are used as they are.

    `max_prompt_length` keeps the END of a longer prompt (TRL does the same): the question and a
    chat prompt's generation prompt are there, and the completion continues from them.

    Shapes: returns (B, P), (B, P).
    """
    conversational = any(isinstance(p, list) for p in prompts)
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]
    # a chat template writes its own BOS; plain prompts get the tokenizer's usual special tokens
    rows = tokenizer(texts, add_special_tokens=not conversational)["input_ids"]
    if max_prompt_length:
        rows = [truncate_left(row, max_prompt_length, tokenizer.bos_token_id) for row in rows]
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)  # (B, P) left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def truncate_left(ids: list[int], max_length: int, bos_token_id: int | None = None) -> list[int]:
    """The last `max_length` tokens of `ids`; a leading BOS stays in front of them.

    TRL cuts the BOS off with the rest; we keep it because the model was trained on sequences that
    start with it (`rlhf.data` drops over-long SFT / reward rows rather than cutting them), and
    models that use BOS as an attention sink degrade when the first token is something else.
    """
    if len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id and max_length > 1:
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts without special tokens (EOS and padding removed)."""
    lengths = rollout.completion_mask.sum(1).tolist()  # the mask is a prefix of each row
    ids = [row[:n] for row, n in zip(rollout.completion_ids.tolist(), lengths)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Where prompts come from, and held-out evaluation (shared by PPO and GRPO)
# --------------------------------------------------------------------------------------------


def load_rl_inputs(cfg, device):
    """What PPO and GRPO read before training, so that bad input (a reward function that does not
    import, a missing checkpoint, model or data file) fails before the run directory is touched.

    Returns (reward functions or None, reward-model scorer or None, checkpoint to resume from or
    None, left-padding tokenizer, training prompt rows, held-out prompts of the built-in task).
    """
    rewards_fn = None
    if cfg.reward_funcs:
        rewards_fn = RewardFunctions(cfg.reward_funcs, cfg.reward_weights, cfg.skip_bad_rewards)
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path, padding_side="left")
    rows = load_prompt_rows(cfg.dataset_name, cfg.dataset_split, cfg.num_train_prompts, cfg.seed)
    eval_prompts = []
    if not cfg.dataset_name and cfg.num_eval_prompts > 0:
        eval_prompts = make_prompts(cfg.num_eval_prompts, seed=cfg.seed, split="eval")
    rm_scorer = RewardModelScorer(cfg.reward_model_path, device) if cfg.reward_model_path else None
    if rm_scorer is not None:  # it scores in eval mode; zeroed as well, like every other model of the RL stages
        disable_dropout(rm_scorer.model)
    return rewards_fn, rm_scorer, resume, tokenizer, rows, eval_prompts


def load_prompt_rows(dataset_name: str, split: str = "train", num_builtin: int = 9000, seed: int = 0) -> list[dict]:
    """Rows with a `prompt` column (other columns go to reward functions as keyword lists).

    Empty `dataset_name`: the built-in arithmetic task's training prompts (never the held-out ones).
    """
    if not dataset_name:
        return [{"prompt": p} for p in make_prompts(num_builtin, seed)]
    rows = load_rows(dataset_name, split, required=["prompt"])
    check_prompts(rows, dataset_name)
    return rows.to_list()


class PromptSource:
    """An endless stream of rows, reshuffled each epoch from `seed`; `position` (rows consumed so far)
    is all a checkpoint needs to continue exactly where it stopped."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        if not rows:
            raise ValueError("no prompts to train on")
        self.rows, self.seed, self.position = rows, seed, position
        self._epoch, self._order = -1, None

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            if epoch != self._epoch:
                self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            out.append(self.rows[int(self._order[i])])
            self.position += 1
        return out

    def take_mine(self, accelerator, n: int) -> list[dict]:
        """This process's `n` rows: every process draws the same n x processes rows (so the position
        stays global, as a checkpoint records it) and keeps its own slice."""
        rows = self.take(n * accelerator.num_processes)
        return rows[accelerator.process_index * n:][:n]


def evaluate_arithmetic(accelerator, model, tokenizer, prompts: list[str], max_new_tokens: int, select=None) -> dict:
    """Greedy held-out evaluation on the built-in task (main process; every process must call it,
    because under ZeRO-3 the parameters are gathered collectively). `select` picks the policy out
    of a wrapper module (PPO's policy + value)."""
    result: dict = {}
    # autocast: the precision of training (PPO's policy is reached past the prepared module's own autocast)
    with gathered_for_generation(accelerator, model) as unwrapped, accelerator.autocast():
        if accelerator.is_main_process:
            policy = select(unwrapped) if select else unwrapped
            result = evaluate_policy(policy, tokenizer, prompts, batch_size=128, max_new_tokens=max_new_tokens)
    accelerator.wait_for_everyone()
    return result
