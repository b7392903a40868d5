"""`rlhf dpo`: Direct Preference Optimization of a causal LM on pairwise preferences or K-wise rankings.

No reward model and no generation: the policy pi is trained so that its implicit reward
r = beta * (log pi(y|x) - log pi_ref(y|x)) orders the responses as the data does (Rafailov et al.
2023, eq. 7), pi_ref being the starting model (usually the SFT model). log pi(y|x) is the sum of
the response tokens' log-probabilities (the mean for `sigmoid_norm`, `ipo` and `simpo`, as TRL does).
`loss_type` is one loss of `rlhf.core.preference` or a list of them, summed with `loss_weights`;
`f_divergence_type` replaces the log-ratio by f-DPO's beta * f'(pi / pi_ref) (`rlhf.core.implicit_rewards`);
`ld_alpha` weighs the tokens of a response past the shorter one's length in each of its pairs (LD-DPO,
`rlhf.core.length_desensitised_logps`); `use_weighting` weighs each pair by how likely the policy is to produce
its responses (WPO, `rlhf.core.wpo_weights`).

Data: the formats `rlhf reward` reads - `prompt` + `chosen` + `rejected`, or `prompt` + `completions` +
`ranks` (0 = best, ties allowed) - checked the same way; without `--dataset_name` the built-in arithmetic
rankings. A prompt's K responses go through the model once, in one (B*K, T) batch, and with
`share_prompt_prefix` the prompt itself once for all K (`rlhf.rollout.grouped_logprobs`: prompt and
responses in one row, each response attending to the prompt and itself; same values, a pair costs
prompt + 2 responses, less their last tokens, instead of 2 x (prompt + response); on CPU the attention pads
its keys to a multiple of 16, `rlhf.models.attention`, and the linear layers run in oneDNN, `rlhf.models.linear`);
the loss (`rlhf.core.dpo_loss`) averages over all C(K, 2) ordered pairs of each prompt (ties skipped), each
prompt weighing the same, or is the Plackett-Luce listwise loss of the ranking (`loss_type:
plackett_luce`, DPO appendix A.3). Pairwise data is K = 2, where every loss type is TRL's.

Reference log-probs are computed once before training (`precompute_ref_log_probs`, one forward pass
over the data) or per batch; with LoRA the reference is the model with its adapters disabled, without
it a frozen copy (only when computed per batch: before training the policy is the reference).
SimPO and `reference_free` use no reference at all. `rpo_alpha` adds RPO's negative log-likelihood of
the best response (Pang et al. 2024, `rlhf.core.best_response_nll`). `sync_ref_model` moves the per-batch
reference towards the policy every `ref_model_sync_steps` steps (TR-DPO, Gorbatovski et al. 2024); checkpoints
hold it.

Order of work: config -> tokenizer, data (all checks) -> model -> reference log-probs -> run
directory (a checkpoint is loaded only now, after the reference pass). Evaluation: held-out
preference accuracy (share of pairs the implicit reward orders as the held-out ranking does; on
the built-in task, gold-ranked candidates of held-out prompts) and, on the built-in arithmetic task,
greedy accuracy on held-out prompts (`eval/accuracy`, as SFT, PPO and GRPO report it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.core import (best_response_nll, dpo_loss, implicit_rewards, length_desensitised_logps, pair_rewards,
                       ranked_pairs, wpo_weights)
from rlhf.core.preference import F_DIVERGENCES, LENGTH_NORMALISED, LOSS_TYPES, ON_MARGINS, SMOOTHED
from rlhf.distributed import (consolidated_state_dict, gather_objects, gathered_for_generation, lerp_parameters,
                              load_consolidated, prepare_frozen, reduce_sum, save_hf_model, unwrap)
from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer
from rlhf.models.attention import use_padded_sdpa
from rlhf.models.linear import use_onednn_linear
# the rankings `rlhf reward` trains on, read and checked the same way
from rlhf.reward import load_groups, prompt_shares
from rlhf.rollout import batch_logprobs, grouped_logprobs
from rlhf.runtime import Timer, arg, check, command_name, resolve_checkpoint, seed_everything
from rlhf.tasks import arithmetic
from rlhf.training import (TrainingConfig, backward, due, end_step, epoch_steps, lora, open_epoch_run,
                           prepare_training, save_checkpoint, scoring_batches, setup_accelerator,
                           step_batches)


@dataclass
class Config(TrainingConfig):
    """Direct Preference Optimization (DPO and variants) on pairwise preferences or K-wise rankings."""

    output_dir: str = arg("runs/dpo", "Run directory; the final model goes to output_dir/model.")
    model_name_or_path: str = arg("builtin:tiny", "Causal LM to train, usually the SFT model; also the reference.")
    dataset_name: str = arg("", "Hub name or local json/jsonl/parquet/csv file with `prompt`+`chosen`+`rejected` or "
                                "`prompt`+`completions`+`ranks`, text or chat messages (whole conversations need no "
                                "`prompt`); empty: generate built-in arithmetic rankings.")
    dataset_split: str = arg("train", "Split of `dataset_name` (hub datasets and directories).")
    eval_dataset_name: str = arg("", "Held-out rankings (same formats); built-in task: held-out prompts by gold score.")
    num_train_prompts: int = arg(4000, "Built-in task: prompts to rank.")
    completions_per_prompt: int = arg(4, "Built-in task: K, the candidate answers ranked per prompt.")
    labeller_noise: float = arg(0.5, "Built-in task: labeller temperature (see `rlhf reward`); 0 ranks by gold score.")
    sampler_model: str = arg("", "Built-in task: sample the K candidates from this causal LM instead.")
    max_length: int = arg(64, "Longest prompt + response in tokens; longer rankings are dropped (in summary.json).")
    loss_type: list[str] = arg(["sigmoid"], "The loss (docs/dpo.md: each one's formula and paper), or several, "
                                            "comma-separated, summed with loss_weights (TRL's MPO: sigmoid,bco_pair,"
                                            "sft with 0.8,0.2,1). sigmoid is DPO; sigmoid_norm, ipo and simpo use mean "
                                            "log-probs; simpo has no reference; plackett_luce is listwise; sft is the "
                                            "best response's NLL.", choices=LOSS_TYPES + ("sft",))
    loss_weights: list[float] = arg([], "Weight of each loss_type, in order (empty: 1 each).")
    beta: float = arg(0.1, "Scale of the implicit reward beta * (log pi - log pi_ref) (IPO: its tau).")
    label_smoothing: float = arg(0.0, "Assumed share of flipped labels eps (sigmoid, sigmoid_norm: cDPO; robust: "
                                      "rDPO; simpo; exo_pair: EXO's epsilon, needed there).")
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin gamma.")
    discopop_tau: float = arg(0.05, "DiscoPOP's temperature tau.")
    f_divergence_type: str = arg("reverse_kl", "f-DPO: the divergence to the reference whose f'(pi / pi_ref) is "
                                               "the implicit reward (reverse_kl: DPO's log-ratio); for the losses on "
                                               "reward differences.", choices=F_DIVERGENCES)
    f_alpha_divergence_coef: float = arg(0.5, "alpha of alpha_divergence: (ratio^(alpha - 1) - 1) / (alpha - 1), in "
                                              "(0, 1] (1: reverse_kl).")
    ld_alpha: float | None = arg(None, "LD-DPO: in each pair, the tokens of a response past the shorter one's "
                                       "length weigh this, in [0, 1] (1: DPO); for the losses on summed log-probs; "
                                       "null: off.")
    use_weighting: bool = arg(False, "WPO: each pair's loss times the product of its responses' weights, exp of "
                                     "the policy's mean log p(token) - log sum_v p(v)^2 (for the pair losses).")
    reference_free: bool = arg(False, "No reference: rewards beta * log pi (simpo always is).")
    rpo_alpha: float = arg(0.0, "RPO: add this times the best response's negative log-likelihood per token "
                                "(`rlhf.core.best_response_nll`; the RPO paper uses 1; the same as loss_type sft "
                                "weighted rpo_alpha); 0: off.")
    precompute_ref_log_probs: bool = arg(True, "Reference log-probs once before training (one pass over the data); "
                                               "false: per batch (a frozen copy, or LoRA adapters off).")
    precompute_ref_batch_size: int = arg(0, "Prompts per batch of the reference pass before training (0: "
                                            "per_device_eval_batch_size).")
    sync_ref_model: bool = arg(False, "TR-DPO: every ref_model_sync_steps optimizer steps the reference becomes "
                                      "ref_model_mixup_alpha x the policy + (1 - alpha) x itself (needs the reference "
                                      "per batch: precompute_ref_log_probs false; not with use_peft).")
    ref_model_mixup_alpha: float = arg(0.6, "TR-DPO's alpha (1: the reference is replaced by the policy).")
    ref_model_sync_steps: int = arg(512, "TR-DPO's tau: optimizer steps between two updates of the reference.")
    share_prompt_prefix: bool = arg(True, "Encode each prompt once for its K responses in the policy, reference and "
                                          "evaluation passes (same values); false: every prompt + response in full.")
    num_train_epochs: float = arg(1.0, "Passes over the rankings (the budget, unless max_steps is smaller).")
    max_steps: int = arg(-1, "Cap on optimizer steps (-1: no cap).")
    per_device_train_batch_size: int = arg(16, "Prompts (each with its K responses) per micro-batch on each process.")
    learning_rate: float = arg(1e-4, "Peak learning rate (AdamW).")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the end).")
    num_eval_prompts: int = arg(500, "Built-in task: held-out prompts whose candidates are ranked by the gold score.")
    num_greedy_eval_prompts: int = arg(500, "Held-out arithmetic prompts answered greedily for eval/accuracy (the "
                                            "built-in task's data, as the pipeline's; 0: skip, e.g. for other data).")
    per_device_eval_batch_size: int = arg(64, "Prompts per evaluation batch.")

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be at least 8, got {self.max_length}")
        super().__post_init__()
        types = self.loss_type
        check(any(t != "sft" for t in types), "loss_type", f"needs a preference loss, got {types} (plain SFT on the "
                                                           "best responses: `rlhf sft`)")
        check(len(set(types)) == len(types), "loss_type", f"names a loss twice: {types}")
        check("simpo" not in types or set(types) <= {"simpo", "sft"}, "loss_type",
              f"simpo has no reference and its own rewards: combine it with sft only, got {types}")
        check(not self.loss_weights or len(self.loss_weights) == len(types), "loss_weights",
              f"needs one weight per loss_type ({len(types)}), got {len(self.loss_weights)}")
        check(all(w > 0 for w in self.loss_weights), "loss_weights", f"must be positive, got {self.loss_weights}")
        check(self.beta > 0, "beta", "must be positive")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(self.label_smoothing == 0 or any(t in SMOOTHED for t in types), "label_smoothing",
              f"applies to loss_type {', '.join(SMOOTHED)}, not {types}")
        check("exo_pair" not in types or self.label_smoothing > 0, "label_smoothing",
              "must be > 0 for exo_pair (EXO's epsilon; its paper uses 1e-3)")
        check(self.discopop_tau > 0, "discopop_tau", "must be positive")
        if self.f_divergence_type != "reverse_kl":
            check(self.uses_reference, "f_divergence_type", "needs a reference (not with simpo or reference_free)")
            others = [t for t in types if t not in ON_MARGINS + ("sft",)]
            check(not others, "f_divergence_type", f"applies to the losses on reward differences "
                                                   f"({', '.join(ON_MARGINS)}), not {others}")
        check(0 < self.f_alpha_divergence_coef <= 1, "f_alpha_divergence_coef", "must be in (0, 1]")
        if self.ld_alpha is not None:
            check(0 <= self.ld_alpha <= 1, "ld_alpha", f"must be in [0, 1] (null: off), got {self.ld_alpha}")
            others = [t for t in types if t in LENGTH_NORMALISED + ("plackett_luce",)]
            check(not others, "ld_alpha", f"weighs the summed log-probs of a pair's responses: not for {others} "
                                          "(mean log-probs, or the listwise loss, which has no pairs)")
        check(not (self.use_weighting and "plackett_luce" in types), "use_weighting",
              "weighs pairs: not for plackett_luce (the listwise loss)")
        check(self.rpo_alpha >= 0, "rpo_alpha", "must be >= 0 (0: off)")
        check(not (self.rpo_alpha and "sft" in types), "rpo_alpha", "and loss_type sft are the same term: give one")
        if self.sync_ref_model:
            check(self.uses_reference, "sync_ref_model", "needs a reference (not with simpo or reference_free)")
            check(not self.precompute_ref_log_probs, "sync_ref_model", "moves the reference, whose log-probs then "
                                                                       "cannot be computed before training: set "
                                                                       "precompute_ref_log_probs false")
            check(not self.use_peft, "sync_ref_model", "needs a copy of the model as its reference; with use_peft "
                                                       "the reference is the model with its adapters off")
        check(0 < self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "must be in (0, 1]")
        check(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be at least 1")
        check(self.num_train_epochs > 0, "num_train_epochs", "must be positive")
        check(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (no cap) or positive")
        check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be positive")
        check(self.precompute_ref_batch_size >= 0, "precompute_ref_batch_size", "must be >= 0 (0: the eval batch size)")
        check(self.num_train_prompts > 0, "num_train_prompts", "must be positive")
        check(2 <= self.completions_per_prompt <= 10, "completions_per_prompt", "must be between 2 and 10")
        check(self.labeller_noise >= 0, "labeller_noise", "must be >= 0")
        check(min(self.eval_steps, self.num_eval_prompts, self.num_greedy_eval_prompts) >= 0, "eval_steps",
              "eval_steps, num_eval_prompts and num_greedy_eval_prompts must be >= 0")

    @property
    def losses(self) -> list[tuple[str, float]]:
        """(loss type, weight) of every term of the loss; rpo_alpha is an sft term."""
        terms = list(zip(self.loss_type, self.loss_weights or [1.0] * len(self.loss_type)))
        return terms + ([("sft", self.rpo_alpha)] if self.rpo_alpha else [])

    @property
    def uses_reference(self) -> bool:
        return not (self.reference_free or "simpo" in self.loss_type)

    @property
    def length_normalised(self) -> bool:
        """Whether the implicit reward reported (rewards/*, evaluation) is on mean log-probs: the first loss's."""
        return next(t for t in self.loss_type if t != "sft") in LENGTH_NORMALISED


# ---------------------------------------------------------------------------------------------
# Data: rankings as `rlhf reward` reads them, plus each response's reference log-prob
# ---------------------------------------------------------------------------------------------


def collate(groups: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B groups of up to K responses in `rlhf.rollout`'s layout: each group's prompt once, left-padded, and its
    responses right-padded after it, so every response starts at column P (the prompt width).

    prompt_ids, prompt_mask (B, P); completion_ids, completion_mask (B*K, R), group-major, the mask covering the
    response and its EOS; a group with fewer than K responses gets empty rows (mask 0), and ranks (B, K) holds -1
    there; ref_logps (B, K) when the groups carry precomputed reference log-probs ((B, K, K) per pair with
    `ld_alpha`).
    """
    k = max(len(g["input_ids"]) for g in groups)
    prompts = [g["input_ids"][0][:g["prompt_len"]] for g in groups]
    responses = [seq[g["prompt_len"]:] for g in groups for seq in g["input_ids"] + [[]] * (k - len(g["input_ids"]))]
    P, R = max(map(len, prompts)), max(1, max(map(len, responses)))
    prompt_ids = torch.tensor([[pad_token_id] * (P - len(p)) + p for p in prompts])  # (B, P)
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # (B, P)
    completion_ids = torch.tensor([r + [pad_token_id] * (R - len(r)) for r in responses])  # (B*K, R)
    completion_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])  # (B*K, R)
    ranks = torch.tensor([g["ranks"] + [-1] * (k - len(g["ranks"])) for g in groups])  # (B, K)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask, "ranks": ranks}
    if "ref_logps" in groups[0] and isinstance(groups[0]["ref_logps"][0], list):  # per pair (LD-DPO): K x K each
        batch["ref_logps"] = torch.zeros(len(groups), k, k)  # (B, K, K)
        for b, g in enumerate(groups):
            n = len(g["ref_logps"])
            batch["ref_logps"][b, :n, :n] = torch.tensor(g["ref_logps"])
    elif "ref_logps" in groups[0]:
        batch["ref_logps"] = torch.tensor([g["ref_logps"] + [0.0] * (k - len(g["ref_logps"])) for g in groups],
                                          dtype=torch.float32)  # (B, K)
    return batch


def collate_shape(group: dict) -> tuple[int, int, int]:
    """What `collate` pads a batch to, for one group: its number of responses, its longest response, its prompt."""
    return len(group["input_ids"]), max(map(len, group["input_ids"])) - group["prompt_len"], group["prompt_len"]


# ---------------------------------------------------------------------------------------------
# Log-probs, the reference
# ---------------------------------------------------------------------------------------------


def response_logps(model, batch: dict, share_prompt_prefix: bool, ld_alpha: float | None = None,
                   with_weights: bool = False):
    """Log-prob (B, K) of each response given its prompt: the sum over its tokens (EOS included); with `ld_alpha`
    one per response and pair (B, K, K), LD-DPO's (`rlhf.core.length_desensitised_logps`). `with_weights`: also
    each response's WPO weight (B, K) (`rlhf.core.wpo_weights`), returned as (logps, weights).

    `share_prompt_prefix`: a group's prompt goes through the model once for its K responses (same values).
    """
    prompt_ids, prompt_mask, mask = batch["prompt_ids"], batch["prompt_mask"], batch["completion_mask"]  # mask (B*K, R)
    (b, k), mask_3d = batch["ranks"].shape, mask.view(*batch["ranks"].shape, -1)
    if share_prompt_prefix:
        out = grouped_logprobs(model, prompt_ids, prompt_mask, batch["completion_ids"], mask,
                               with_log_sum_sq=with_weights)  # (B*K, R)
    else:
        input_ids = torch.cat([prompt_ids.repeat_interleave(k, 0), batch["completion_ids"]], 1)  # (B*K, P+R)
        out = batch_logprobs(model, input_ids, torch.cat([prompt_mask.repeat_interleave(k, 0), mask], 1),
                             prompt_ids.shape[1], with_log_sum_sq=with_weights)
    token_logp, log_sum_sq = out if with_weights else (out, None)
    if ld_alpha is not None:
        logps = length_desensitised_logps(token_logp.view(b, k, -1), mask_3d, ld_alpha)  # (B, K, K)
    else:
        logps = (token_logp * mask).sum(dim=1).view(b, k)  # (B, K)
    return (logps, wpo_weights(token_logp, log_sum_sq, mask).view(b, k)) if with_weights else logps


def response_tokens(batch: dict) -> torch.Tensor:
    """Tokens (B, K) of each response, EOS included (at least 1: padding responses have none), for mean log-probs."""
    return batch["completion_mask"].sum(dim=1).clamp_min(1).view(batch["ranks"].shape)


class ReferenceWeights:
    """A moving (TR-DPO) reference's weights as checkpoint state: `state_dict` / `load_state_dict` are collective
    (the full weights on the main process; ZeRO-3 gathers and re-partitions them)."""

    def __init__(self, accelerator, reference):
        self.accelerator, self.reference = accelerator, reference

    def state_dict(self) -> dict:
        return consolidated_state_dict(self.accelerator, self.reference)

    def load_state_dict(self, state: dict) -> None:
        load_consolidated(self.accelerator, self.reference, state)


def load_reference(cfg: Config):
    """A frozen copy of the starting model, only where one is needed: reference log-probs per batch without LoRA."""
    if not cfg.uses_reference or cfg.precompute_ref_log_probs or cfg.use_peft:
        return None
    reference = use_onednn_linear(use_padded_sdpa(disable_dropout(load_causal_lm(cfg.model_name_or_path))))
    return reference.eval().requires_grad_(False)


@torch.no_grad()
def reference_logps(accelerator, model, reference, batch: dict, cfg: Config) -> torch.Tensor:
    """log pi_ref (B, K), or (B, K, K) with `ld_alpha`: the frozen copy, or the policy with LoRA adapters off, or
    (before training) the policy."""
    if reference is not None:
        with accelerator.autocast():
            return response_logps(reference, batch, cfg.share_prompt_prefix, cfg.ld_alpha)
    unwrapped = unwrap(accelerator, model)
    off = unwrapped.disable_adapter() if cfg.use_peft else contextlib.nullcontext()
    with off, accelerator.autocast():
        return response_logps(unwrapped, batch, cfg.share_prompt_prefix, cfg.ld_alpha)


def add_reference_logps(accelerator, model, groups: list[dict], cfg: Config, pad_token_id: int, bs: int) -> None:
    """Store each group's reference log-probs (`ref_logps`: K floats, K x K with `ld_alpha`) in place; call before
    the first update, while the policy is still the reference. `bs`: prompts per batch (of `scoring_batches`).
    """
    mine = []
    was_training = model.training
    model.eval()
    with gathered_for_generation(accelerator, model) as unwrapped:
        for chunk in scoring_batches(accelerator, groups, bs, collate_shape):
            batch = {k: v.to(accelerator.device) for k, v in collate([groups[i] for i in chunk], pad_token_id).items()}
            ref = reference_logps(accelerator, unwrapped, None, batch, cfg)  # (B, K) or (B, K, K)
            for b, i in enumerate(chunk):
                n = len(groups[i]["ranks"])
                mine.append((i, (ref[b, :n, :n] if ref.dim() == 3 else ref[b, :n]).tolist()))
    model.train(was_training)
    for i, ref in gather_objects(accelerator, mine):
        groups[i]["ref_logps"] = ref


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def batch_loss(accelerator, model, reference, batch: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """The weighted sum of `cfg.losses`. Logged: `loss/dpo` (the preference terms; with several, each as
    `loss/<type>` too), `loss/nll` (sft), and the first preference loss's rewards/* and logps/*."""
    with accelerator.autocast():
        out = response_logps(model, batch, cfg.share_prompt_prefix, cfg.ld_alpha, cfg.use_weighting)
    logps, weights = out if cfg.use_weighting else (out, None)
    logps = logps.float()  # (B, K) or (B, K, K)
    ref = None
    if cfg.uses_reference:
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(accelerator, model, reference, batch,
                                                                                cfg).float()
    tokens = response_tokens(batch)
    several = sum(t != "sft" for t, _ in cfg.losses) > 1
    loss = dpo_part = 0.0
    metrics = {}
    for loss_type, weight in cfg.losses:
        if loss_type == "sft":  # LD-DPO's diagonal is each response's plain sum
            sums = logps.diagonal(dim1=1, dim2=2) if logps.dim() == 3 else logps
            term = metrics["loss/nll"] = best_response_nll(sums / tokens, batch["ranks"])
        else:
            lp, rp = logps, ref
            if loss_type in LENGTH_NORMALISED:  # mean log-probs per token
                lp, rp = logps / tokens, None if ref is None else ref / tokens
            term, m = dpo_loss(lp, rp, batch["ranks"], beta=cfg.beta, loss_type=loss_type,
                               label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                               discopop_tau=cfg.discopop_tau, f_divergence=cfg.f_divergence_type,
                               f_alpha=cfg.f_alpha_divergence_coef, weights=weights)
            if several:
                m[f"loss/{loss_type}"] = m["loss/dpo"]
            dpo_part = dpo_part + weight * m.pop("loss/dpo")
            for k, v in m.items():  # rewards/* and logps/*: the first preference loss's
                metrics.setdefault(k, v)
        loss = loss + weight * term
    metrics["loss/dpo"] = dpo_part
    return loss, {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def evaluate(accelerator, model, tokenizer, eval_groups: list[dict] | None, cfg: Config) -> dict:
    """Held-out preference accuracy and mean reward margin (pairs pooled), and greedy accuracy on the built-in task."""
    metrics = {}
    model.eval()
    with gathered_for_generation(accelerator, model) as unwrapped:
        if eval_groups:
            correct = margin = n_pairs = 0.0
            for chunk in scoring_batches(accelerator, eval_groups, cfg.per_device_eval_batch_size, collate_shape):
                batch = {k: v.to(accelerator.device) for k, v in collate([eval_groups[i] for i in chunk],
                                                                         tokenizer.pad_token_id).items()}
                with accelerator.autocast():
                    logps = response_logps(unwrapped, batch, cfg.share_prompt_prefix, cfg.ld_alpha).float()
                ref = batch["ref_logps"] if cfg.uses_reference else None
                if cfg.length_normalised:
                    tokens = response_tokens(batch)
                    logps, ref = logps / tokens, None if ref is None else ref / tokens
                rewards = implicit_rewards(logps, ref, cfg.beta, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
                pairs = ranked_pairs(batch["ranks"]).float()  # (B, K, K)
                better, worse = pair_rewards(rewards)
                diff = better - worse  # (B, K, K): r_better - r_worse on pairs
                correct += float(((diff > 0).float() * pairs).sum())
                margin += float((diff * pairs).sum())
                n_pairs += float(pairs.sum())
            total = reduce_sum(accelerator, n_pairs).clamp_min(1)
            metrics["eval/preference_accuracy"] = float(reduce_sum(accelerator, correct) / total)
            metrics["eval/rewards/margins"] = float(reduce_sum(accelerator, margin) / total)
        if cfg.num_greedy_eval_prompts > 0:
            prompts = arithmetic.make_prompts(cfg.num_greedy_eval_prompts, cfg.seed, split="eval")
            metrics.update(arithmetic.evaluate_policy(unwrapped, tokenizer, prompts, cfg.per_device_eval_batch_size))
    model.train()
    return metrics


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    accelerator = setup_accelerator(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    resume_dir = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    groups, eval_groups, dropped = load_groups(cfg, tokenizer)
    global_batch, total_steps = epoch_steps(cfg, accelerator, len(groups))

    # TRL switches dropout off too: the policy and the reference then score a response the same way. DPO's rows
    # are short: on CPU, attention's keys padded to a multiple of 16 cost less than those rows' scalar tail; the
    # linear layers (LoRA's too) run oneDNN's float32 kernels on AVX-512 AMD CPUs, 2x MKL's on large products.
    model = load_causal_lm(cfg.model_name_or_path, gradient_checkpointing=cfg.gradient_checkpointing)
    model = use_onednn_linear(disable_dropout(lora(use_padded_sdpa(model), cfg)))
    reference = load_reference(cfg)
    model, optimizer, scheduler = prepare_training(accelerator, model, cfg, total_steps)
    if reference is not None:
        reference = prepare_frozen(accelerator, reference)
    if cfg.uses_reference:  # the policy has not moved yet (a checkpoint loads below): it is the reference here
        if cfg.precompute_ref_log_probs:
            add_reference_logps(accelerator, model, groups, cfg, tokenizer.pad_token_id,
                                cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size)
        if eval_groups:
            add_reference_logps(accelerator, model, eval_groups, cfg, tokenizer.pad_token_id,
                                cfg.per_device_eval_batch_size)
    moving = {"reference": ReferenceWeights(accelerator, reference)} if cfg.sync_ref_model else {}
    start, metrics, run, bar = open_epoch_run(cfg, accelerator, resume_dir, scheduler, total_steps, "dpo", **moving)

    def save(step):
        save_checkpoint(run, accelerator, step, {"metrics": metrics}, scheduler=scheduler, **moving)

    timer = Timer()
    model.train()
    for step in range(start, total_steps):
        batches = step_batches(accelerator, cfg, step, groups, collate, tokenizer.pad_token_id)
        sums, update = {}, {}
        for batch, weight in zip(batches, prompt_shares(accelerator, batches)):  # dpo_loss: a mean over prompts
            with accelerator.accumulate(model):
                loss, m = batch_loss(accelerator, model, reference, batch, cfg)
                update = backward(accelerator, model, optimizer, scheduler, loss * weight, cfg.max_grad_norm)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
        done = step + 1
        if cfg.sync_ref_model and done % cfg.ref_model_sync_steps == 0:  # TR-DPO (Gorbatovski et al. 2024)
            lerp_parameters(accelerator, reference, model, cfg.ref_model_mixup_alpha)
        metrics = {**{k: float(reduce_sum(accelerator, v)) for k, v in sums.items()}, **update,
                   "train/epoch": done * global_batch / len(groups),
                   "time/sps": (done - start) * global_batch / max(timer.elapsed(), 1e-9)}
        if due(cfg.eval_steps, done, total_steps):
            metrics.update(evaluate(accelerator, model, tokenizer, eval_groups, cfg))
        end_step(run, bar, cfg, done, total_steps, metrics,
                 ["loss/dpo", "rewards/accuracies", "eval/preference_accuracy", "eval/accuracy"], lambda: save(done))
    bar.close()
    train_seconds = timer.elapsed()
    if start < total_steps:
        save(total_steps)

    final = evaluate(accelerator, model, tokenizer, eval_groups, cfg)
    run.log(total_steps, final)
    save_hf_model(accelerator, model, Path(cfg.output_dir) / "model", tokenizer, merge_lora=not cfg.save_adapter_only)
    summary = {**final, "step": total_steps, "train/loss_last": metrics.get("loss/dpo"),
               "train/rewards_accuracies_last": metrics.get("rewards/accuracies"),
               "data/train_rankings": len(groups), **dropped, "time/train_s": train_seconds}
    run.write_summary(summary)
    run.close()
    return summary
