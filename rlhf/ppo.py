"""`rlhf ppo`: PPO with a KL penalty to a frozen reference (Ziegler et al. 2019; Ouyang et al. 2022).

One step = one rollout batch and its update (as TRL's PPOTrainer counts them):

1. Sample one completion per prompt from the policy (`rlhf.rollout.generate`, KV cache).
2. Score it: a learned reward model (`reward_model_path`) or Python reward functions; a
   completion without EOS loses `missing_eos_penalty`; optionally minus the score of the policy's
   greedy completion (`score_baseline`, ReMax); optional clipping of the score.
3. One no-grad forward of policy + value gives old log-probs and values; the reference (the SFT
   model, or the LoRA policy with adapters off) gives ref log-probs.
4. Per-token reward: r_t = -beta * KL_t (`kl_estimator` k1 | k2 | k3 of pi_old vs pi_ref), plus the
   score on the last completion token (Ziegler et al. eq. 2 in per-token form).
5. Token GAE (`gamma`, `lam`; `rlhf.core.token_gae`), advantages whitened over the whole batch.
6. `num_ppo_epochs` passes over the batch in `num_mini_batches` shuffled mini-batches, each one
   optimizer step of `gradient_accumulation_steps` micro-batches: clipped policy loss + `vf_coef`
   x clipped value loss, token means normalised by the mini-batch's global token count.
7. The KL coefficient beta is fixed, or adapted towards `kl_target` (PPO-paper rule or Ziegler's
   proportional controller); its state is saved with each checkpoint.

`kl/ref` is the mean per-token KL(pi || pi_ref) of the sampled completions (k1 of the rollout),
the same unit as GRPO's; `kl/ref_seq` is the per-completion sum.

Batch accounting (as TRL): per process and step, per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches completions, one per prompt.
The policy and value model are one module (`PolicyAndValue`) with one optimizer, so DDP and
DeepSpeed see a single engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForTokenClassification, LlamaForTokenClassification
from transformers.utils import logging as hf_logging

from rlhf.core import (aggregate_loss, explained_variance, kl_controller, kl_estimate, masked_mean, masked_whiten,
                       per_token_rewards, ppo_clip_loss, token_gae, truncated_importance_weights, value_loss)
from rlhf.distributed import gathered_for_generation, loss_normaliser, prepare_frozen, reduce_sum, save_hf_model, unwrap
from rlhf.models import BUILTIN_MODELS, builtin_config, check_model_path, disable_dropout, load_causal_lm
from rlhf.rollout import (
    PromptSource, batch_logprobs, decode_completions, evaluate_arithmetic, generate, load_rl_inputs,
    position_ids_from_mask, tokenize_prompts,
)
from rlhf.runtime import Timer, arg, check, progress, seed_everything
from rlhf.tasks.arithmetic import gold_score
from rlhf.training import (
    SCHEDULERS, TrainingConfig, backward, due, end_step, lora, open_run, prepare_training, save_checkpoint,
    setup_accelerator,
)
from rlhf.vllm_engine import VLLMOptions, mismatch_metrics, start_engine


@dataclasses.dataclass
class Config(VLLMOptions, TrainingConfig):
    """PPO against a reward model or reward functions, with a KL penalty to a frozen reference."""

    output_dir: str = arg("runs/ppo", "Run directory.")
    model_name_or_path: str = arg("builtin:tiny", "Policy to start from (the SFT model); also the frozen reference.")
    reward_model_path: str = arg("", "Learned reward model (from `rlhf reward`). Empty: use reward_funcs.")
    reward_funcs: list[str] = arg([], "Reward functions instead of / added to the reward model: built-in names "
                                      "(exact_match, format, gold_score), module:function or path/to/file.py:function.")
    reward_weights: list[float] = arg([], "One weight per reward function (empty: all 1).")
    skip_bad_rewards: bool = arg(False, "Skip (and count) completions whose reward is missing / non-finite instead of "
                                        "stopping: they are masked out of the loss, the advantage whitening and the "
                                        "score metrics.")
    value_model_path: str = arg("", "Value model to start from (a directory); empty: see value_init.")
    value_init: str = arg("reward_model", "Without value_model_path, start the value model from the reward model "
                                          "(if given; TRL's choice) or from the policy with a fresh head.",
                          choices=["reward_model", "policy"])
    dataset_name: str = arg("", "Prompts: a hub name or local json/jsonl/parquet/csv with a `prompt` column. "
                                "Empty: the built-in arithmetic task.")
    dataset_split: str = arg("train", "Split of dataset_name.")
    num_train_prompts: int = arg(9000, "Built-in task only: how many training prompts to draw.")
    num_eval_prompts: int = arg(500, "Built-in task only: held-out prompts for greedy evaluation (0: no evaluation).")
    eval_steps: int = arg(0, "Evaluate every this many steps (0: only at the start and the end).")
    max_steps: int = arg(100, "PPO steps (one rollout batch + its num_ppo_epochs x num_mini_batches optimizer steps).")
    per_device_train_batch_size: int = arg(16, "Completions per micro-batch per process.")
    num_mini_batches: int = arg(4, "Mini-batches (optimizer steps) per epoch over one rollout batch.")
    num_ppo_epochs: int = arg(4, "Passes over each rollout batch.")
    rollout_batch_size: int = arg(0, "Completions per no-grad forward pass when a rollout is scored (old log-probs, "
                                     "values, reference; TRL's local_rollout_forward_batch_size). 0: "
                                     "per_device_train_batch_size, which makes the first PPO ratio exactly 1; "
                                     "larger is faster and matches it to float rounding.")
    max_prompt_length: int = arg(0, "Keep the last this many tokens of a longer prompt (a leading BOS stays; 0: all).")
    max_completion_length: int = arg(8, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature (the log-probs in the loss use the same one).")
    top_p: float = arg(1.0, "Nucleus sampling mass (1: off).")
    top_k: int = arg(0, "Sample from the k most likely tokens (0: off).")
    learning_rate: float = arg(1e-5, "AdamW step size (policy and value model).")
    lr_scheduler_type: str = arg("constant", "Learning-rate schedule over the optimizer steps.", choices=SCHEDULERS)
    warmup_ratio: float = arg(0.0, "Share of the optimizer steps spent warming the learning rate up from 0.")
    kl_coef: float = arg(0.05, "beta: weight of the per-token KL penalty in the reward (initial value if adaptive).")
    kl_estimator: str = arg("k1", "KL estimator in the reward.", choices=["k1", "k2", "k3"])
    kl_controller: str = arg("fixed", "fixed beta; adaptive (PPO paper: halve/double around kl_target); "
                                      "proportional (Ziegler et al. 2019, with kl_horizon).",
                             choices=["fixed", "adaptive", "proportional"])
    kl_target: float = arg(0.1, "Target per-token KL for the adaptive / proportional controller.")
    kl_horizon: float = arg(10000, "Horizon (in completions) of the proportional controller.")
    missing_eos_penalty: float | None = arg(None, "Subtracted from the score of a completion without EOS (null: off).")
    reward_clip: float = arg(0.0, "Clip the score to [-reward_clip, reward_clip] (0: off).")
    score_baseline: str = arg("none", "Subtract a per-prompt baseline from the score: greedy = the score of the "
                                      "policy's greedy completion (ReMax, Li et al. 2023); it removes the reward "
                                      "model's per-prompt offset, which a fresh value model learns slowly.",
                              choices=["none", "greedy"])
    whiten_rewards: bool = arg(False, "Whiten the per-token rewards (scale only) before GAE.")
    whiten_advantages: bool = arg(True, "Whiten advantages over the batch.")
    gamma: float = arg(1.0, "Discount over completion tokens.")
    lam: float = arg(0.95, "GAE lambda.")
    cliprange: float = arg(0.2, "Policy ratio clip range.")
    cliprange_value: float = arg(0.2, "Value clip range around the old values (0: no clipping).")
    vf_coef: float = arg(0.1, "Weight of the value loss.")
    entropy_coef: float = arg(0.0, "Entropy bonus: subtract entropy_coef x the tokens' mean entropy from the loss.")

    def __post_init__(self):
        super().__post_init__()
        check(self.max_steps > 0, "max_steps", "must be positive")
        for name in ("per_device_train_batch_size", "num_mini_batches", "num_ppo_epochs", "max_completion_length"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.rollout_batch_size >= 0, "rollout_batch_size", "must be >= 0 (0: per_device_train_batch_size)")
        check(bool(self.reward_model_path) or bool(self.reward_funcs), "reward_model_path",
              "give a reward model (--reward_model_path) or reward functions (--reward_funcs)")
        check(not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
              f"{len(self.reward_weights)} weights for {len(self.reward_funcs)} reward functions")
        check(self.temperature > 0, "temperature", "must be positive")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.kl_target > 0, "kl_target", "must be positive")
        check(self.kl_horizon > 0, "kl_horizon", "must be positive")
        check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        check(self.cliprange > 0, "cliprange", "must be positive")
        check(self.cliprange_value >= 0, "cliprange_value", "must be >= 0")
        check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: one optimizer, one DDP / DeepSpeed engine."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    @property
    def config(self):
        """The policy's config: DeepSpeed sizes its "auto" buckets from its `hidden_size`."""
        return self.policy.config

    def forward(self, input_ids, attention_mask, completion_start: int, temperature: float, with_entropy=False):
        """Log-probs of the completion tokens and the value of the state before each of them (and, with
        `with_entropy`, the entropy of each next-token distribution).

        Shapes: input_ids, attention_mask (B, P + T); returns logp (B, T), values (B, T)[, entropy (B, T)].
        """
        out = batch_logprobs(self.policy, input_ids, attention_mask, completion_start, temperature,
                             with_entropy=with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        hidden = self.value_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  position_ids=position_ids_from_mask(attention_mask)).logits  # (B, P + T, 1)
        # V(s_t) for token t is read where the model has seen everything before t: one position earlier.
        values = hidden[:, completion_start - 1:-1, 0].float()  # (B, T)
        return (logp, values, entropy) if with_entropy else (logp, values)


def load_value_model(path: str):
    """A per-token scalar head (AutoModelForTokenClassification, num_labels=1, no dropout).

    From a reward model directory the body and the `score` weights carry over, so the first values
    are the reward model's per-token scores; from a causal LM the head starts fresh.
    """
    check_model_path(path)
    if path in BUILTIN_MODELS:
        config = builtin_config(path)
        config.num_labels, config.classifier_dropout = 1, 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForTokenClassification(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a new `score.bias` (and `score.weight` from an LM) is expected
    try:
        config = AutoConfig.from_pretrained(path, num_labels=1)
        config.classifier_dropout = 0.0  # the generic head reads this; dropout would make values noisy
        return AutoModelForTokenClassification.from_pretrained(path, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_models(cfg):
    """(policy + value module, frozen reference or None for LoRA: the policy with adapters disabled)."""
    # No dropout anywhere: old log-probs and values, the update's passes and the reference must be one function.
    policy = load_causal_lm(cfg.model_name_or_path, gradient_checkpointing=cfg.gradient_checkpointing)
    policy, reference = disable_dropout(lora(policy, cfg)), None
    if not cfg.use_peft:
        reference = disable_dropout(load_causal_lm(cfg.model_name_or_path)).eval().requires_grad_(False)
    from_reward_model = cfg.value_init == "reward_model" and cfg.reward_model_path
    value_model = disable_dropout(load_value_model(cfg.value_model_path or (cfg.reward_model_path if from_reward_model
                                                                            else cfg.model_name_or_path)))
    if cfg.gradient_checkpointing:
        value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PolicyAndValue(policy, value_model), reference


# --------------------------------------------------------------------------------------------
# Rollout and advantages
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_scores(cfg, accelerator, model, tokenizer, prompts, prompt_ids, prompt_mask, columns, rewards_fn, rm_scorer,
                  batch_index, engine=None) -> torch.Tensor:
    """Scores (n,) of the policy's greedy completions: a baseline that depends on the prompt only."""
    if engine is not None:
        rollout = engine.generate(prompt_ids, prompt_mask, cfg.max_completion_length, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, cfg.temperature, greedy=True)
    else:
        with gathered_for_generation(accelerator, model) as unwrapped, accelerator.autocast():
            rollout = generate(unwrapped.policy, prompt_ids, prompt_mask, cfg.max_completion_length,
                               tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.temperature, greedy=True)
    completions = decode_completions(tokenizer, rollout)
    scores = torch.zeros(len(prompts))
    if rm_scorer is not None:
        scores = scores + rm_scorer(prompts, completions)
    if rewards_fn is not None:
        scores = scores + rewards_fn(prompts, completions, columns, batch=f"{batch_index} (greedy baseline)")[0]
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * rollout.is_truncated.float().cpu()
    return scores


@torch.no_grad()
def make_batch(cfg, accelerator, model, reference, tokenizer, rows, rewards_fn, rm_scorer, beta, batch_index,
               engine=None) -> dict:
    """Generate, score and compute advantages for this process's prompts (one completion each)."""
    prompts = [row["prompt"] for row in rows]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, accelerator.device, cfg.max_prompt_length or None)
    if engine is not None:  # use_vllm: the same Rollout, from the vLLM engine (synced with the policy)
        rollout = engine.generate(prompt_ids, prompt_mask, cfg.max_completion_length, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p)
    else:  # autocast: sampling, the training pass and the reference all see the same precision
        with gathered_for_generation(accelerator, model) as unwrapped, accelerator.autocast():
            rollout = generate(unwrapped.policy, prompt_ids, prompt_mask, cfg.max_completion_length,
                               tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p)
    completions = decode_completions(tokenizer, rollout)
    # (n, P + T), (n, T)
    input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
    start, n, mb = prompt_ids.shape[1], len(prompts), cfg.rollout_batch_size or cfg.per_device_train_batch_size

    scores = torch.zeros(n)
    valid = torch.ones(n, dtype=torch.bool)
    per_function = None
    if rm_scorer is not None:
        scores = scores + rm_scorer(prompts, completions)
    if rewards_fn is not None:
        fn_rewards, per_function, valid = rewards_fn(prompts, completions, columns, batch=batch_index)
        scores = scores + fn_rewards
    raw_scores = scores.clone()
    baseline = None
    if cfg.score_baseline == "greedy":
        baseline = greedy_scores(cfg, accelerator, model, tokenizer, prompts, prompt_ids, prompt_mask, columns,
                                 rewards_fn, rm_scorer, batch_index, engine)
        scores = scores - baseline
    scores = scores.to(accelerator.device)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * rollout.is_truncated.float()
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    mask = mask * valid.to(mask.device).long()[:, None]

    # Old log-probs and values from the training forward pass itself, and the reference's log-probs, in
    # batches of rollout_batch_size rows: at the training micro-batch size (the default) the first
    # ratio is exactly 1, even under bf16 autocast; other sizes may round differently.
    old_logp, old_values, ref_logp = [], [], []
    for i in range(0, n, mb):
        lp, v = model(input_ids[i:i + mb], attention_mask[i:i + mb], start, cfg.temperature)
        old_logp.append(lp)
        old_values.append(v)
        if reference is not None:
            with accelerator.autocast():
                ref_logp.append(batch_logprobs(reference, input_ids[i:i + mb], attention_mask[i:i + mb], start,
                                               cfg.temperature))
        else:
            policy = accelerator.unwrap_model(model).policy
            with policy.disable_adapter(), accelerator.autocast():
                ref_logp.append(
                    batch_logprobs(policy, input_ids[i : i + mb], attention_mask[i : i + mb], start, cfg.temperature)
                )
    old_logp, old_values, ref_logp = torch.cat(old_logp), torch.cat(old_values), torch.cat(ref_logp)  # (n, T)

    kl = kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask  # (n, T)
    rewards = per_token_rewards(scores * valid.to(scores.device), kl, mask, beta)  # (n, T)
    all_processes = lambda t: reduce_sum(accelerator, t)  # noqa: E731  the statistics of the global batch
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_processes)
    advantages, returns = token_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (n, T)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, all_reduce=all_processes)
    if engine is not None and cfg.vllm_importance_sampling_correction:
        # truncated IS: old_logp is the trainer's, rollout.sampler_logprobs vLLM's, of the same tokens
        advantages = advantages * truncated_importance_weights(
            old_logp, rollout.sampler_logprobs, mask, cfg.vllm_importance_sampling_cap,
            cfg.vllm_importance_sampling_level)

    k1 = (old_logp - ref_logp) * mask
    gather = accelerator.gather
    valid_scores = gather(raw_scores.to(accelerator.device))[gather(valid.to(accelerator.device).long()).bool()]
    metrics = {
        "reward/score_mean": float(valid_scores.mean()) if valid_scores.numel() else float("nan"),
        "reward/score_std": float(valid_scores.std()) if valid_scores.numel() > 1 else 0.0,
        "kl/ref": float(reduce_sum(accelerator, k1.sum()) / reduce_sum(accelerator, mask.sum()).clamp_min(1)),
        "kl/ref_seq": float(gather(k1.sum(1)).mean()),
        "reward/non_score": float(gather((-beta * kl).sum(1)).mean()),
        "completions/mean_length": float(gather(rollout.completion_mask.sum(1).float()).mean()),
        "completions/clipped_ratio": float(gather(rollout.is_truncated.float()).mean()),
    }
    if engine is not None:  # trainer vs vLLM on the sampled tokens of all processes
        metrics.update(mismatch_metrics(accelerator, old_logp, rollout.sampler_logprobs, mask))
    if baseline is not None:
        metrics["reward/baseline_mean"] = float(gather(baseline.to(accelerator.device)).mean())
    if per_function is not None:
        metrics.update(rewards_fn.metrics(per_function))
    if not cfg.dataset_name:  # the built-in task: also track the gold score of what was sampled
        gold = torch.tensor([gold_score(p, c) for p, c in zip(prompts, completions)], device=accelerator.device)
        metrics["reward/gold_mean"] = float(gather(gold).mean())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "start": start, "mask": mask,
            "old_logp": old_logp, "old_values": old_values, "advantages": advantages, "returns": returns,
            "metrics": metrics}


# --------------------------------------------------------------------------------------------
# Update
# --------------------------------------------------------------------------------------------


def micro_batch_loss(cfg, logp, values, batch, idx, num_tokens, entropy=None):
    """This micro-batch's share of a mini-batch's PPO loss: policy + vf_coef * value - entropy_coef *
    entropy (token means over the mini-batch's global token count). Shapes: logp, values, entropy (b, T); idx (b,)."""
    mask = batch["mask"][idx]
    pg_loss, pg_m = ppo_clip_loss(logp, batch["old_logp"][idx], batch["advantages"][idx], mask, cfg.cliprange,
                                  mode="token-mean", num_tokens=num_tokens)
    vf_loss, vf_m = value_loss(values, batch["old_values"][idx], batch["returns"][idx],
                               cfg.cliprange_value or None, mask, mode="token-mean", num_tokens=num_tokens)
    loss, metrics = pg_loss + cfg.vf_coef * vf_loss, {**pg_m, **vf_m}
    if entropy is not None:  # the bonus: maximise the entropy of the policy's next-token distributions
        loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, "token-mean", num_tokens=num_tokens)
        metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    return loss, metrics


def update(cfg, accelerator, model, optimizer, scheduler, batch) -> dict:
    """`num_ppo_epochs` passes over the rollout batch in shuffled mini-batches, one optimizer step each."""
    mb, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    n = batch["mask"].shape[0]
    keys = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "value/clipfrac")
    keys += ("policy/entropy",) if cfg.entropy_coef > 0 else ()
    sums, last_update = dict.fromkeys((*keys, "tokens"), 0.0), {}
    model.train()
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(n, device=batch["mask"].device)
        for start in range(0, n, mb * ga):
            mini = order[start:start + mb * ga]
            num_tokens = loss_normaliser(accelerator, batch["mask"][mini].sum())
            for i in range(0, len(mini), mb):
                idx = mini[i:i + mb]
                with accelerator.accumulate(model):
                    out = model(batch["input_ids"][idx], batch["attention_mask"][idx], batch["start"],
                                cfg.temperature, with_entropy=cfg.entropy_coef > 0)
                    logp, values, entropy = out if cfg.entropy_coef > 0 else (*out, None)
                    loss, m = micro_batch_loss(cfg, logp, values, batch, idx, num_tokens, entropy)
                    last_update.update(backward(accelerator, model, optimizer, scheduler, loss, cfg.max_grad_norm))
                tokens = float(batch["mask"][idx].sum())
                sums["loss/policy"] += float(m["loss/policy"])
                sums["loss/value"] += float(m["loss/value"])
                for k in keys[2:]:
                    sums[k] += float(m[k]) * tokens
                sums["tokens"] += tokens
    total = reduce_sum(accelerator, torch.tensor([sums[k] for k in (*keys, "tokens")]))
    n_updates = cfg.num_ppo_epochs * cfg.num_mini_batches
    tokens = max(float(total[-1]), 1.0)
    out = {"loss/policy": float(total[0]) / n_updates, "loss/value": float(total[1]) / n_updates}
    out.update({k: float(total[j]) / tokens for j, k in enumerate(keys) if j >= 2})
    out["value/explained_var"] = float(explained_variance(batch["old_values"], batch["returns"], batch["mask"]))
    return {**out, **last_update}  # train/lr and train/grad_norm of the step's last update


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    accelerator = setup_accelerator(cfg)
    world = accelerator.num_processes
    seed_everything(cfg.seed + accelerator.process_index, cfg.deterministic)  # different samples per process

    # Bad input fails here, before the run directory is touched.
    rewards_fn, rm_scorer, resume, tokenizer, rows, eval_prompts = load_rl_inputs(cfg, accelerator.device)

    model, reference = load_models(cfg)  # a missing value model or LoRA target fails here, before the run directory
    n_updates = cfg.max_steps * cfg.num_ppo_epochs * cfg.num_mini_batches
    model, optimizer, scheduler = prepare_training(accelerator, model, cfg, n_updates)
    if reference is not None:  # sharded evaluation-only engine under ZeRO-3, plain module otherwise
        reference = prepare_frozen(accelerator, reference)
    if rm_scorer is not None:
        rm_scorer.model = prepare_frozen(accelerator, rm_scorer.model)
    kl_ctl = kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    prompts_per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches
    # use_vllm: this process's engine (a missing package or a model vLLM cannot serve fails here, before the run dir)
    engine = start_engine(cfg, accelerator, unwrap(accelerator, model).policy, tokenizer,
                          max_num_seqs=prompts_per_process)
    source = PromptSource(rows, cfg.seed)
    fresh = {"step": 0, "data_position": 0, "kl_history": [], "summary_start": {}, "metrics": {}}
    state, _, run = open_run(cfg, accelerator, resume, fresh, scheduler=scheduler, kl_controller=kl_ctl)
    step, source.position, kl_history = state["step"], state["data_position"], list(state["kl_history"])
    summary_start, metrics = state["summary_start"], state["metrics"]

    def save():  # metrics: the last step's, for summary.json after a resume from the final checkpoint
        save_checkpoint(run, accelerator, step, {"data_position": source.position, "kl_history": kl_history,
                                                 "summary_start": summary_start, "metrics": metrics},
                        scheduler=scheduler, kl_controller=kl_ctl)

    select_policy = lambda m: m.policy  # noqa: E731
    if eval_prompts and step == 0:
        summary_start = {f"start/{k}": v for k, v in evaluate_arithmetic(
            accelerator, model, tokenizer, eval_prompts, cfg.max_completion_length, select_policy).items()}
        run.log(0, summary_start)

    timer, bar = Timer(), progress(cfg.max_steps, "ppo", cfg.progress and accelerator.is_main_process, initial=step)
    while step < cfg.max_steps:
        step_timer = Timer()
        beta = kl_ctl.beta
        sync_time = engine.sync_if_stale(unwrap(accelerator, model).policy) if engine is not None else None
        batch = make_batch(cfg, accelerator, model, reference, tokenizer,
                           source.take_mine(accelerator, prompts_per_process), rewards_fn, rm_scorer, beta, step,
                           engine)
        metrics = batch.pop("metrics")
        metrics["time/generation_s"] = step_timer.elapsed()
        if engine is not None:
            engine.release()
            metrics["time/weight_sync_s"] = sync_time
        metrics.update(update(cfg, accelerator, model, optimizer, scheduler, batch))
        if engine is not None:
            engine.stale = True  # the update changed the policy
        kl_ctl.update(metrics["kl/ref"], n_steps=prompts_per_process * world)
        metrics["kl/beta"] = beta
        step += 1
        kl_history = (kl_history + [metrics["kl/ref"]])[-10:]
        metrics["time/step_s"] = step_timer.elapsed()
        metrics["completions/per_s"] = prompts_per_process * world / metrics["time/step_s"]
        if eval_prompts and due(cfg.eval_steps, step, cfg.max_steps):
            metrics.update(evaluate_arithmetic(accelerator, model, tokenizer, eval_prompts, cfg.max_completion_length,
                                               select_policy))
        end_step(run, bar, cfg, step, cfg.max_steps, metrics,
                 ["reward/score_mean", "kl/ref", "kl/beta", "eval/accuracy"], save)
    bar.close()
    if engine is not None:
        engine.close()  # now, not at garbage collection: under a launch its shutdown must keep the process group

    save()
    summary = {**summary_start, "step": step, "time/train_s": timer.elapsed()}
    if eval_prompts:
        summary.update(evaluate_arithmetic(accelerator, model, tokenizer, eval_prompts, cfg.max_completion_length,
                                           select_policy))
    summary["kl/ref"] = sum(kl_history) / len(kl_history) if kl_history else 0.0
    summary["kl/beta"] = kl_ctl.beta
    summary["kl/target"] = cfg.kl_target if cfg.kl_controller != "fixed" else None
    for k in ("reward/score_mean", "reward/gold_mean"):
        if k in metrics:
            summary[k] = metrics[k]
    unwrapped = accelerator.unwrap_model(model)
    save_hf_model(accelerator, unwrapped.policy, Path(cfg.output_dir) / "model", tokenizer,
                  merge_lora=not cfg.save_adapter_only)
    save_hf_model(accelerator, unwrapped.value_model, Path(cfg.output_dir) / "value_model", tokenizer, merge_lora=False)
    if eval_prompts:
        run.log(step, {k: v for k, v in summary.items() if k.startswith("eval/")})
    run.write_summary(summary)
    run.close()
    return summary
