"""`rlhf grpo`: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", sec. 4.1).

For each prompt q the policy samples G completions o_1..o_G; each gets a scalar reward r_i (weighted
reward functions or a learned reward model) and the advantage of every token of o_i is the
group-normalised reward (eq. 3; `rlhf.core.group_advantages`, `scale_rewards` = group | batch | none).
The loss is the clipped surrogate plus beta times the k3 estimate of KL(pi || pi_ref) (eqs. 1-2):

    L = agg_t [ -min(r_t A_i, clip(r_t, 1 - eps, 1 + eps_high) A_i) + beta * k3_t ],
    r_t = pi(o_t) / pi_old(o_t),   k3_t = pi_ref / pi - log(pi_ref / pi) - 1,
    eps = `cliprange`, eps_high = `cliprange_high` (PPO's name; TRL's GRPO names, `epsilon` and
    `epsilon_high`, are accepted too),

aggregated by `loss_type`: grpo = mean over sequences of each one's token mean (the paper),
bnpo = mean over all tokens, dr_grpo = token sum / max_completion_length, mean over sequences
(Liu et al. 2025), dapo = bnpo (here already the step's global token mean). See docs/grpo.md for why the loss
can read 0 at the first iteration.

Variants (docs/grpo.md, "Variants"; the math in rlhf.core): `importance_sampling_level` sequence (GSPO),
`advantage_estimator` rloo / reinforce_pp / remax, `kl_estimator`, `kl_in_reward`, `entropy_coef`, DAPO's
`dynamic_sampling` and overlong punishment (`overlong_buffer_len`, `overlong_penalty`).

Batch accounting (as TRL): `per_device_train_batch_size` counts COMPLETIONS; one optimizer step
uses per_device_train_batch_size x gradient_accumulation_steps x processes completions, i.e. that
many / num_generations prompts, and every process generates whole groups. The loss of a
micro-batch is its share of the whole step's loss (normalised by the step's global number of
sequences or tokens), so 1 x 8 accumulation equals 8 x 1 and 2 processes x B equal 1 x 2B.

`num_iterations` > 1 reuses one generation for that many optimizer steps; pi_old is then the
sampling policy, whose log-probs the rollout already returned (same temperature, same positions).
With `num_iterations` = 1, pi_old = pi detached: the ratio is exactly 1 and the gradient is the
plain policy gradient of the paper.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from rlhf.core import (aggregate_loss, baseline_advantages, group_advantages, group_stats, informative_groups,
                       kl_estimate, masked_mean, overlong_penalty, ppo_clip_loss, reinforce_pp_advantages,
                       rloo_advantages, truncated_importance_weights)
from rlhf.distributed import gathered_for_generation, loss_normaliser, prepare_frozen, reduce_sum, save_hf_model, unwrap
from rlhf.models import disable_dropout, load_causal_lm
from rlhf.rollout import (
    PromptSource, batch_logprobs, cat_rollouts, decode_completions, evaluate_arithmetic, generate, load_rl_inputs,
    tokenize_prompts,
)
from rlhf.runtime import Timer, arg, check, progress, seed_everything
from rlhf.training import (
    SCHEDULERS, TrainingConfig, backward, due, end_step, lora, open_run, prepare_training, save_checkpoint,
    setup_accelerator,
)
from rlhf.vllm_engine import VLLMOptions, mismatch_metrics, start_engine

# dapo is bnpo's normaliser under TRL's name: here bnpo already divides by the step's global token count
LOSS_MODES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "token-mean"}
ADVANTAGE_ESTIMATORS = ["grpo", "rloo", "reinforce_pp", "remax"]


@dataclasses.dataclass
class Config(VLLMOptions, TrainingConfig):
    """GRPO: group-normalised advantages, no critic."""

    output_dir: str = arg("runs/grpo", "Run directory.")
    model_name_or_path: str = arg("builtin:tiny", "Policy to start from (usually the SFT model); also the reference.")
    dataset_name: str = arg("", "Prompts: a hub name or a local json/jsonl/parquet/csv file with a `prompt` column "
                                "(other columns are passed to reward functions). Empty: the built-in arithmetic task.")
    dataset_split: str = arg("train", "Split of dataset_name.")
    num_train_prompts: int = arg(9000, "Built-in task only: how many training prompts to draw.")
    num_eval_prompts: int = arg(500, "Built-in task only: held-out prompts for greedy evaluation (0: no evaluation).")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the start and the end).")
    max_steps: int = arg(100, "Optimizer steps.")
    per_device_train_batch_size: int = arg(64, "Completions (not prompts) per micro-batch per process.")
    num_generations: int = arg(8, "G: completions per prompt (one group).")
    max_prompt_length: int = arg(0, "Keep the last this many tokens of a longer prompt (a leading BOS stays; 0: all).")
    max_completion_length: int = arg(8, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature (the log-probs in the loss use the same one).")
    top_p: float = arg(1.0, "Nucleus sampling mass (1: off). Filtering makes sampling slightly off-policy.")
    top_k: int = arg(0, "Sample from the k most likely tokens (0: off).")
    learning_rate: float = arg(1e-6, "AdamW step size.")
    lr_scheduler_type: str = arg("constant", "Learning-rate schedule over max_steps.", choices=SCHEDULERS)
    warmup_ratio: float = arg(0.0, "Share of max_steps spent warming the learning rate up from 0.")
    beta: float = arg(0.04, "KL coefficient (in the loss, or in the reward with kl_in_reward). 0 loads no reference "
                            "model at all.")
    kl_estimator: str = arg("k3", "Estimator of KL(pi || pi_ref) in the loss: k1, k2 or k3 (Schulman's note).",
                            choices=["k1", "k2", "k3"])
    kl_in_reward: bool = arg(False, "Subtract beta x the k1 KL of the sampled tokens from the reward (as PPO does) "
                                    "instead of adding beta x KL to the loss.")
    entropy_coef: float = arg(0.0, "Entropy bonus: subtract entropy_coef x the tokens' entropy (aggregated as the "
                                   "loss) from the loss.")
    cliprange: float = arg(0.2, "Clip range of the ratio (lower side; also the upper side unless cliprange_high).",
                           aliases=["epsilon"])
    cliprange_high: float | None = arg(None, "Upper clip range (DAPO clip-higher); null: same as cliprange.",
                                       aliases=["epsilon_high"])
    num_iterations: int = arg(1, "Optimizer steps per generated batch (mu in the paper).")
    loss_type: str = arg("grpo", "Aggregation: grpo (sequence mean of token means), bnpo or dapo (token mean over "
                                 "the whole step: every micro-batch and process), dr_grpo (token sum / "
                                 "max_completion_length).", choices=list(LOSS_MODES))
    importance_sampling_level: str = arg("token", "Ratio of the clipped surrogate: token (GRPO) or sequence (GSPO: "
                                                  "exp(mean_t log ratio) per completion, clipped per completion).",
                                         choices=["token", "sequence"])
    advantage_estimator: str = arg("grpo", "grpo (group mean / std, see scale_rewards), rloo (minus the mean of the "
                                           "group's other rewards), reinforce_pp (REINFORCE++: KL-penalised token "
                                           "returns whitened over the global batch; needs kl_in_reward or beta 0), "
                                           "remax (minus the reward of the prompt's greedy completion).",
                                   choices=ADVANTAGE_ESTIMATORS)
    scale_rewards: str = arg("group", "advantage_estimator grpo: divide centred rewards by the group std, the batch "
                                      "std, or nothing.",
                             choices=["group", "batch", "none"])
    reward_funcs: list[str] = arg(["exact_match"], "Reward functions: built-in names (exact_match, format, "
                                                   "gold_score), "
                                                   "module:function or path/to/file.py:function.")
    reward_weights: list[float] = arg([], "One weight per reward function (empty: all 1).")
    reward_model_path: str = arg("", "A learned reward model; its score is added with weight reward_model_weight.")
    reward_model_weight: float = arg(1.0, "Weight of the reward model's score.")
    skip_bad_rewards: bool = arg(False, "Skip (and count) completions whose reward is missing / non-finite instead of "
                                        "stopping: they are left out of their group's mean and std, get advantage 0 "
                                        "and are masked out of the loss.")
    mask_truncated_completions: bool = arg(False, "Leave completions without EOS out of the loss.")
    dynamic_sampling: bool = arg(False, "DAPO dynamic sampling: drop groups whose rewards all agree and sample more "
                                        "prompts until every process has its batch of groups.")
    max_sampling_rounds: int = arg(4, "dynamic_sampling: at most this many generation rounds per batch; then the "
                                      "groups kept are trained on and the batch is filled with masked-out ones.")
    overlong_buffer_len: int = arg(0, "DAPO overlong punishment: over the last this many tokens before "
                                      "max_completion_length the reward ramps down linearly (0: off).")
    overlong_penalty: float = arg(1.0, "DAPO overlong punishment at max_completion_length tokens (the ramp's end).")
    share_prompt_prefix: bool = arg(True, "Encode each prompt once per group in the training and reference passes "
                                          "(same values; off with gradient_checkpointing).")

    def __post_init__(self):
        super().__post_init__()
        check(self.max_steps > 0, "max_steps", "must be positive")
        check(self.num_generations >= 2, "num_generations", "needs at least 2 completions per prompt to form a group")
        check(self.per_device_train_batch_size > 0, "per_device_train_batch_size", "must be positive")
        check((self.per_device_train_batch_size * self.gradient_accumulation_steps) % self.num_generations == 0,
              "per_device_train_batch_size",
              f"per_device_train_batch_size x gradient_accumulation_steps "
              f"({self.per_device_train_batch_size} x {self.gradient_accumulation_steps}) must be a multiple of "
              f"num_generations ({self.num_generations}): each process generates whole groups")
        check(self.max_completion_length > 0, "max_completion_length", "must be positive")
        check(self.temperature > 0, "temperature", "must be positive")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.beta >= 0, "beta", "must be >= 0")
        check(self.cliprange > 0, "cliprange", "must be positive")
        check(self.cliprange_high is None or self.cliprange_high > 0, "cliprange_high", "must be positive")
        check(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        check(self.advantage_estimator != "reinforce_pp" or self.kl_in_reward or self.beta == 0, "advantage_estimator",
              "reinforce_pp puts the KL penalty in the token rewards: set kl_in_reward true (or beta 0)")
        check(self.advantage_estimator == "grpo" or self.scale_rewards == "group", "scale_rewards",
              f"applies to advantage_estimator grpo only, not {self.advantage_estimator}")
        check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        check(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        check(0 <= self.overlong_buffer_len <= self.max_completion_length, "overlong_buffer_len",
              f"must be in [0, max_completion_length = {self.max_completion_length}]")
        check(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")
        check(bool(self.reward_funcs) or bool(self.reward_model_path), "reward_funcs",
              "give at least one reward function or a reward_model_path")
        check(not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
              f"{len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_policy_and_reference(cfg):
    """The trainable policy and the frozen reference (None when beta = 0, or when LoRA is used:
    the reference is then the policy with its adapters disabled — no second copy in memory)."""
    dtype = "float32"  # mixed precision comes from accelerate; master weights stay fp32
    policy = load_causal_lm(cfg.model_name_or_path, dtype=dtype, gradient_checkpointing=cfg.gradient_checkpointing)
    # pi_old (the sampler), the training pass and pi_ref must be one function
    policy = disable_dropout(lora(policy, cfg))
    if cfg.use_peft or cfg.beta == 0:
        return policy, None
    reference = disable_dropout(load_causal_lm(cfg.model_name_or_path, dtype=dtype)).eval().requires_grad_(False)
    return policy, reference


@torch.inference_mode()  # the result only enters the loss as a constant
def reference_logprobs(accelerator, policy, reference, input_ids, attention_mask, start, temperature, share):
    """log pi_ref of the completion tokens: the frozen copy, or the LoRA policy with adapters off."""
    if reference is not None:
        with accelerator.autocast():  # the precision the training pass runs in
            return batch_logprobs(reference, input_ids, attention_mask, start, temperature, share)
    unwrapped = unwrap(accelerator, policy)
    with unwrapped.disable_adapter(), accelerator.autocast():
        return batch_logprobs(unwrapped, input_ids, attention_mask, start, temperature, share)


def share_prompts(cfg) -> bool:
    # HF turns the KV cache off under gradient checkpointing, which prompt sharing needs.
    return cfg.share_prompt_prefix and not cfg.gradient_checkpointing


# --------------------------------------------------------------------------------------------
# One generated batch: completions, rewards, advantages, reference log-probs
# --------------------------------------------------------------------------------------------


def score(cfg, rewards_fn, rm_scorer, prompts, completions, columns, batch_index):
    """Rewards (n,), per-function values (n, F) or None, valid (n,) of completions (reward functions + model)."""
    per_function, valid = None, torch.ones(len(completions), dtype=torch.bool)
    rewards = torch.zeros(len(completions))
    if rewards_fn is not None:
        rewards, per_function, valid = rewards_fn(prompts, completions, columns, batch=batch_index)
    if rm_scorer is not None:
        rewards = rewards + cfg.reward_model_weight * rm_scorer(prompts, completions)
    return rewards, per_function, valid


def sample_groups(cfg, accelerator, model, tokenizer, rows, rewards_fn, rm_scorer, batch_index, engine=None) -> dict:
    """Generate G completions for each of this process's `rows` and score them.

    Returns the rollout (n = len(rows) x G rows, prompt-major: a group's completions are consecutive),
    rewards, valid (n,), per_function (n, F) or None; for ReMax also the reward of each prompt's greedy
    completion, baseline and baseline_valid (len(rows),).
    """
    G, remax = cfg.num_generations, cfg.advantage_estimator == "remax"
    prompts = [row["prompt"] for row in rows for _ in range(G)]
    columns = {k: [row[k] for row in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [row["prompt"] for row in rows], accelerator.device,
                                               cfg.max_prompt_length or None)
    greedy = None
    if engine is not None:  # use_vllm: the same Rollout, from the vLLM engine (synced with the policy)
        args = (prompt_ids, prompt_mask, cfg.max_completion_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                cfg.temperature)
        rollout = engine.generate(*args, cfg.top_k, cfg.top_p, num_return_sequences=G)
        if remax:
            greedy = engine.generate(*args, greedy=True)
    else:  # each prompt encoded once, sampled G times; autocast: the same precision as the training pass
        with gathered_for_generation(accelerator, model) as unwrapped, accelerator.autocast():
            # ReMax: the prompt's greedy completion is decoded in the same pass, as its (G + 1)-th row
            rollout = generate(unwrapped, prompt_ids, prompt_mask, cfg.max_completion_length, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p,
                               num_return_sequences=G + remax, greedy_last=remax)
        if remax:
            last = torch.arange(len(rollout.is_truncated), device=rollout.is_truncated.device) % (G + 1) == G
            greedy, rollout = rollout.select(last), rollout.select(~last)
    rewards, per_function, valid = score(cfg, rewards_fn, rm_scorer, prompts, decode_completions(tokenizer, rollout),
                                         columns, batch_index)
    # DAPO eq. 13: lengths in tokens (EOS included), the reward's part that punishes running out of room
    shaping = lambda r: overlong_penalty(r.completion_mask.sum(1).cpu(), cfg.max_completion_length,  # noqa: E731
                                         cfg.overlong_buffer_len, cfg.overlong_penalty)
    out = {"rollout": rollout, "rewards": rewards + shaping(rollout), "valid": valid, "per_function": per_function}
    if greedy is not None:
        baseline, _, baseline_valid = score(cfg, rewards_fn, rm_scorer, [row["prompt"] for row in rows],
                                            decode_completions(tokenizer, greedy),
                                            {k: [row[k] for row in rows] for k in columns}, f"{batch_index} (greedy)")
        out.update(baseline=baseline + shaping(greedy), baseline_valid=baseline_valid)
    return out


def collect_groups(cfg, accelerator, model, tokenizer, source, n_prompts, rewards_fn, rm_scorer, batch_index,
                   engine=None) -> tuple[dict, dict]:
    """This process's `n_prompts` groups for one batch, and what was sampled on the way.

    One round of `sample_groups`; with `dynamic_sampling` (DAPO, Yu et al. 2025 sec. 3.2) groups whose
    rewards all agree are dropped and rounds of `n_prompts` more prompts follow (every process draws
    its share from the one PromptSource, so the position stays global and resumable) until every
    process has kept `n_prompts` groups, at most `max_sampling_rounds` rounds. A process short of
    groups then fills its batch with dropped ones, flagged `filler` (masked out of the loss).
    Returns (the batch's groups with `filler` (n,) bool, everything sampled: for the reward metrics).
    """
    G, parts, rounds = cfg.num_generations, [], 0
    n_kept = 0
    while True:
        rounds += 1
        index = batch_index if rounds == 1 else f"{batch_index} (round {rounds})"
        parts.append(sample_groups(cfg, accelerator, model, tokenizer, source.take_mine(accelerator, n_prompts),
                                   rewards_fn, rm_scorer, index, engine))
        if not cfg.dynamic_sampling:
            break
        n_kept += int(informative_groups(parts[-1]["rewards"], G, parts[-1]["valid"]).sum())
        short = float(reduce_sum(accelerator, max(n_prompts - n_kept, 0)))  # every process takes the same decision
        if short == 0 or rounds == cfg.max_sampling_rounds:
            break
    sampled = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "rollout" and parts[0][k] is not None}
    sampled["rollout"] = cat_rollouts([p["rollout"] for p in parts], tokenizer.pad_token_id)
    sampled.setdefault("per_function", None)
    groups = torch.arange(len(parts) * n_prompts)
    if cfg.dynamic_sampling:  # the first n_prompts groups kept, then (bound hit) the first dropped ones as fillers
        keep = informative_groups(sampled["rewards"], G, sampled["valid"])
        groups = torch.cat([groups[keep], groups[~keep]])[:n_prompts]
        filler = ~keep[groups]
    else:
        filler = torch.zeros(n_prompts, dtype=torch.bool)
    rows = (groups[:, None] * G + torch.arange(G)).reshape(-1)  # (n,)
    batch = {k: v[rows] for k, v in sampled.items() if k not in ("rollout", "per_function", "baseline",
                                                                  "baseline_valid")}
    batch["rollout"] = sampled["rollout"].select(rows.to(sampled["rollout"].is_truncated.device))
    if "baseline" in sampled:
        batch.update(baseline=sampled["baseline"][groups], baseline_valid=sampled["baseline_valid"][groups])
    batch["filler"] = filler.repeat_interleave(G)
    if cfg.dynamic_sampling:
        dropped = len(parts) * n_prompts - n_kept
        counts = reduce_sum(accelerator, torch.tensor([dropped, int(filler.sum())]))
        sampled["metrics"] = {"sampling/rounds": rounds, "sampling/dropped_groups": int(counts[0]),
                              "sampling/filler_groups": int(counts[1])}
    return batch, sampled


def make_batch(cfg, accelerator, model, reference, tokenizer, source, n_prompts, rewards_fn, rm_scorer, batch_index,
               engine=None) -> dict:
    """Sample this process's `n_prompts` groups (`collect_groups`) and compute what the loss needs.

    Returns tensors over this process's n = per_device_train_batch_size x gradient_accumulation_steps
    completions (prompt-major) plus metrics.
    """
    G = cfg.num_generations
    data, sampled = collect_groups(cfg, accelerator, model, tokenizer, source, n_prompts, rewards_fn, rm_scorer,
                                   batch_index, engine)
    rollout, rewards, n = data["rollout"], data["rewards"], len(data["rewards"])
    valid = data["valid"] & ~data["filler"]  # a filler group teaches nothing: out of the statistics and the loss

    mask = rollout.completion_mask.clone()  # (n, T)
    if cfg.mask_truncated_completions:
        mask = mask * (~rollout.is_truncated).long()[:, None]
    mask = mask * valid.to(mask.device).long()[:, None]
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    start = rollout.prompt_ids.shape[1]

    ref_logp = None
    if cfg.beta > 0:
        mb = cfg.per_device_train_batch_size
        ref_logp = torch.cat([
            reference_logprobs(accelerator, model, reference, input_ids[i:i + mb], attention_mask[i:i + mb], start,
                               cfg.temperature, share_prompts(cfg))
            for i in range(0, n, mb)
        ])  # (n, T)

    old_logp = rollout.logprobs
    if engine is not None and cfg.num_iterations > 1:
        # pi_old is the policy that sampled, as the TRAINER computes it (vLLM's log-probs differ slightly): the
        # training pass at the micro-batch size, so the ratio of the first iteration is exactly 1
        mb = cfg.per_device_train_batch_size
        with torch.no_grad():
            old_logp = torch.cat([batch_logprobs(model, input_ids[i:i + mb], attention_mask[i:i + mb], start,
                                                 cfg.temperature, share_prompts(cfg)) for i in range(0, n, mb)])

    metrics = {}
    kl_reward = cfg.kl_in_reward and cfg.beta > 0
    k1 = (old_logp - ref_logp) * mask if kl_reward else None  # (n, T) per-token KL of the sampled tokens
    if kl_reward:
        tokens = reduce_sum(accelerator, mask.sum()).clamp_min(1)
        metrics["kl/ref"] = float(reduce_sum(accelerator, k1.sum()) / tokens)
    device = accelerator.device
    if cfg.advantage_estimator == "reinforce_pp":  # token advantages (n, T), whitened over every process's tokens
        advantages = reinforce_pp_advantages(rewards.to(device) * valid.to(device), k1 if kl_reward else
                                             torch.zeros_like(old_logp), mask, cfg.beta,
                                             all_reduce=lambda t: reduce_sum(accelerator, t))
    else:  # one advantage per completion, over the whole step's batch (all processes): scale_rewards=batch is global
        seq_rewards = rewards.to(device) - (cfg.beta * k1.sum(1) if kl_reward else 0.0)  # (n,)
        all_rewards = accelerator.gather(seq_rewards)  # (n * W,)
        all_valid = accelerator.gather(valid.to(device).long()).bool()  # (n * W,)
        if cfg.advantage_estimator == "grpo":
            all_advantages = group_advantages(all_rewards, G, scale=cfg.scale_rewards, valid=all_valid)
        elif cfg.advantage_estimator == "rloo":
            all_advantages = rloo_advantages(all_rewards, G, all_valid)
        else:  # remax
            all_advantages = baseline_advantages(
                all_rewards, accelerator.gather(data["baseline"].to(device)), G, all_valid,
                accelerator.gather(data["baseline_valid"].to(device).long()).bool())
            metrics["reward/baseline_mean"] = float(accelerator.gather(data["baseline"].to(device)).mean())
        rank = accelerator.process_index
        advantages = all_advantages[rank * n:(rank + 1) * n]  # (n,)

    # reward metrics: everything sampled this step (all rounds of dynamic sampling), i.e. the policy's own level
    s_rewards = accelerator.gather(sampled["rewards"].to(device))
    s_valid = accelerator.gather(sampled["valid"].to(device).long()).bool()
    zero_std = (group_stats(s_rewards, G, s_valid)[1] < 1e-8).float().mean()  # groups that teach nothing
    valid_rewards = s_rewards[s_valid]
    s_rollout = sampled["rollout"]
    lengths = s_rollout.completion_mask.sum(1).float()
    metrics.update({
        "reward/mean": float(valid_rewards.mean()) if valid_rewards.numel() else math.nan,
        "reward/std": float(valid_rewards.std()) if valid_rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": float(zero_std),
        "completions/mean_length": float(accelerator.gather(lengths.to(device)).mean()),
        "completions/clipped_ratio": float(accelerator.gather(s_rollout.is_truncated.float().to(device)).mean()),
        **sampled.get("metrics", {}),
    })
    if sampled["per_function"] is not None:
        metrics.update(rewards_fn.metrics(sampled["per_function"]))  # this process's completions
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "start": start, "mask": mask,
        "advantages": advantages.to(device), "old_logp": old_logp, "ref_logp": ref_logp,
        "sampler_logp": rollout.sampler_logprobs, "fillers": metrics.get("sampling/filler_groups", 0) * G,
        "metrics": metrics,
    }


# --------------------------------------------------------------------------------------------
# One optimizer step on a generated batch
# --------------------------------------------------------------------------------------------


def micro_batch_loss(cfg, logp, batch, sl, num_seqs, num_tokens, entropy=None):
    """This micro-batch's share of the step's GRPO loss (global normalisers), with its metrics.

    Shapes: logp, entropy (b, T); batch tensors (n, T) sliced by `sl`.
    """
    mask = batch["mask"][sl]
    # num_iterations = 1: pi_old = pi (detached), ratio exactly 1; otherwise the sampling policy.
    old_logp = batch["old_logp"][sl] if cfg.num_iterations > 1 else logp.detach()
    agg = dict(mode=LOSS_MODES[cfg.loss_type], max_len=cfg.max_completion_length, num_seqs=num_seqs,
               num_tokens=num_tokens)
    advantages, sampler_logp = batch["advantages"][sl], batch.get("sampler_logp")
    if sampler_logp is not None and cfg.vllm_importance_sampling_correction:
        # truncated IS (w > 0 and constant, so w * A in the clipped surrogate is w times each token's term)
        weights = truncated_importance_weights(old_logp, sampler_logp[sl], mask, cfg.vllm_importance_sampling_cap,
                                               cfg.vllm_importance_sampling_level)  # (b, T)
        advantages = (advantages if advantages.dim() == 2 else advantages[:, None]) * weights
    loss, metrics = ppo_clip_loss(logp, old_logp, advantages, mask, cfg.cliprange, cfg.cliprange_high,
                                  level=cfg.importance_sampling_level, **agg)
    if sampler_logp is not None:  # pi_old as the trainer computes it vs as vLLM did, on the sampled tokens
        metrics["sampler_logp"] = (old_logp, sampler_logp[sl])
    metrics["policy/clip_sum"] = (metrics["policy/clipfrac"] * mask.sum()).detach()
    if cfg.beta > 0 and not cfg.kl_in_reward:
        kl = kl_estimate(logp, batch["ref_logp"][sl], cfg.kl_estimator)  # (b, T)
        loss = loss + cfg.beta * aggregate_loss(kl, mask, **agg)
        metrics["kl_sum"] = (masked_mean(kl, mask) * mask.sum()).detach()
    if entropy is not None:  # the bonus: maximise the entropy of the policy's next-token distributions
        loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, **agg)
        metrics["entropy_sum"] = (masked_mean(entropy, mask) * mask.sum()).detach()
    metrics["tokens"] = mask.sum().detach()
    return loss, metrics


def train_step(cfg, accelerator, model, optimizer, scheduler, batch) -> dict:
    """One optimizer step on a generated batch, in gradient_accumulation_steps micro-batches."""
    mb, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    # every completion of the step counts as a sequence (masked ones add 0), except dynamic sampling's fillers
    num_seqs = mb * ga * accelerator.num_processes - batch.get("fillers", 0)
    num_tokens = loss_normaliser(accelerator, batch["mask"].sum())
    keys = ("loss", "clip", "kl", "tokens", "ratio", "entropy")
    totals, update, pairs = dict.fromkeys(keys, 0.0), {}, []
    model.train()
    for i in range(ga):
        sl = slice(i * mb, (i + 1) * mb)
        with accelerator.accumulate(model):
            out = batch_logprobs(model, batch["input_ids"][sl], batch["attention_mask"][sl], batch["start"],
                                 cfg.temperature, share_prompts(cfg), with_entropy=cfg.entropy_coef > 0)  # (b, T)
            logp, entropy = out if cfg.entropy_coef > 0 else (out, None)
            loss, m = micro_batch_loss(cfg, logp, batch, sl, num_seqs, num_tokens, entropy)
            update = backward(accelerator, model, optimizer, scheduler, loss, cfg.max_grad_norm)
        totals["loss"] += float(loss.detach())
        totals["ratio"] += float(m["policy/ratio_mean"] * m["tokens"])
        totals["clip"] += float(m["policy/clip_sum"])
        totals["kl"] += float(m.get("kl_sum", 0.0))
        totals["tokens"] += float(m["tokens"])
        totals["entropy"] += float(m.get("entropy_sum", 0.0))
        if "sampler_logp" in m:
            pairs.append((*m["sampler_logp"], batch["mask"][sl]))
    total = reduce_sum(accelerator, torch.tensor([totals[k] for k in keys]))
    tokens = max(float(total[3]), 1.0)
    out = {
        "loss/policy": float(total[0]),
        "policy/clipfrac": float(total[1]) / tokens,
        "policy/ratio_mean": float(total[4]) / tokens,
        **update,
    }
    if cfg.beta > 0 and not cfg.kl_in_reward:  # (in the reward: make_batch measures it on the sampled tokens)
        out["kl/ref"] = float(total[2]) / tokens
    if cfg.entropy_coef > 0:
        out["policy/entropy"] = float(total[5]) / tokens
    if pairs:  # this process's rollout (use_vllm)
        out.update(mismatch_metrics(*(torch.cat(t) for t in zip(*pairs))))
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    accelerator = setup_accelerator(cfg)
    world = accelerator.num_processes
    seed_everything(cfg.seed + accelerator.process_index, cfg.deterministic)  # different samples per process

    # Everything that can fail on bad input fails here, before the run directory is touched.
    rewards_fn, rm_scorer, resume, tokenizer, rows, eval_prompts = load_rl_inputs(cfg, accelerator.device)

    # a LoRA target that matches nothing fails before the run directory
    policy, reference = load_policy_and_reference(cfg)
    model, optimizer, scheduler = prepare_training(accelerator, policy, cfg, cfg.max_steps)
    if reference is not None:  # sharded evaluation-only engine under ZeRO-3, plain module otherwise
        reference = prepare_frozen(accelerator, reference)
    if rm_scorer is not None:
        rm_scorer.model = prepare_frozen(accelerator, rm_scorer.model)

    prompts_per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    # use_vllm: this process's engine (a missing package or a model vLLM cannot serve fails here, before the run dir)
    engine = start_engine(cfg, accelerator, model, tokenizer, max_num_seqs=prompts_per_process * cfg.num_generations)
    source = PromptSource(rows, cfg.seed)
    fresh = {"step": 0, "data_position": 0, "kl_history": [], "batch_metrics": {}, "summary_start": {}}
    # batch: this process's generated batch, reused for num_iterations steps (a checkpoint keeps it)
    state, batch, run = open_run(cfg, accelerator, resume, fresh, scheduler=scheduler)
    step, source.position, kl_history = state["step"], state["data_position"], list(state["kl_history"])
    batch_metrics, summary_start = state["batch_metrics"], state["summary_start"]

    def save():
        save_checkpoint(run, accelerator, step, {"data_position": source.position, "kl_history": kl_history,
                                                 "batch_metrics": batch_metrics, "summary_start": summary_start},
                        process_state=batch, scheduler=scheduler)

    if eval_prompts and step == 0:
        summary_start = {
            f"start/{k}": v
            for k, v in evaluate_arithmetic(accelerator, model, tokenizer, eval_prompts,
                                            cfg.max_completion_length).items()
        }
        run.log(0, summary_start)

    timer, bar = Timer(), progress(cfg.max_steps, "grpo", cfg.progress and accelerator.is_main_process, initial=step)
    while step < cfg.max_steps:
        step_timer = Timer()
        sync_time = None
        if step % cfg.num_iterations == 0 or batch is None:
            if engine is not None:  # the policy's current weights into the engine, in place (after an update)
                sync_time = engine.sync_if_stale(model)
            batch = make_batch(cfg, accelerator, model, reference, tokenizer, source, prompts_per_process, rewards_fn,
                               rm_scorer, step, engine)
            batch_metrics = batch.pop("metrics")
            if engine is not None:
                engine.release()
        gen_time = step_timer.elapsed()
        metrics = train_step(cfg, accelerator, model, optimizer, scheduler, batch)
        step += 1
        if engine is not None:
            engine.stale = True  # the step changed the policy
        metrics.update(batch_metrics)
        if sync_time is not None:
            metrics["time/weight_sync_s"] = sync_time
        elapsed = step_timer.elapsed()
        metrics["time/step_s"] = elapsed
        metrics["time/generation_s"] = gen_time
        metrics["completions/per_s"] = prompts_per_process * cfg.num_generations * world / elapsed
        if "kl/ref" in metrics:
            kl_history = (kl_history + [metrics["kl/ref"]])[-10:]
        if eval_prompts and due(cfg.eval_steps, step, cfg.max_steps):
            metrics.update(evaluate_arithmetic(accelerator, model, tokenizer, eval_prompts, cfg.max_completion_length))
        end_step(run, bar, cfg, step, cfg.max_steps, metrics,
                 ["reward/mean", "kl/ref", "frac_reward_zero_std", "eval/accuracy"], save)
    bar.close()

    save()
    summary = {**summary_start, "step": step, "time/train_s": timer.elapsed()}
    if eval_prompts:
        summary.update(evaluate_arithmetic(accelerator, model, tokenizer, eval_prompts, cfg.max_completion_length))
    summary["kl/ref"] = sum(kl_history) / len(kl_history) if kl_history else 0.0
    summary["reward/mean"] = batch_metrics.get("reward/mean", math.nan)
    save_hf_model(accelerator, model, Path(cfg.output_dir) / "model", tokenizer, merge_lora=not cfg.save_adapter_only)
    if eval_prompts:
        run.log(step, {k: v for k, v in summary.items() if k.startswith("eval/")})
    run.write_summary(summary)
    run.close()
    return summary
