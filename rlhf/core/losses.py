"""Policy, value, Q-learning and reward-model losses as pure functions on tensors.

Policy and value losses take a per-token (or per-sample) tensor, a ``mask`` and an aggregation
``mode`` (see :func:`rlhf.core.masked.aggregate_loss`, which also documents the ``max_len``,
``num_tokens`` and ``num_seqs`` keyword arguments passed through ``**agg``). Classic RL uses
1-D per-sample tensors and ``mask=None``, where every mode reduces to the plain mean.

Losses return ``(loss, metrics)``; metrics values are detached 0-d tensors (``float(v)`` to log),
so a training loop is not forced into a device sync per micro-batch. ``td_loss`` returns
``(loss, td_errors)`` instead (the TD errors feed prioritised replay).

References:
- Williams 1992 (REINFORCE); Schulman et al. 2017 "Proximal Policy Optimization Algorithms"
  (PPO, eqs. 6-9); Yu et al. 2025 (DAPO, asymmetric "clip-higher"); Zheng et al. 2025
  "Group Sequence Policy Optimization" (GSPO, eqs. 7 and 10: the sequence-level ratio).
- Mnih et al. 2015 (DQN); van Hasselt et al. 2016 (Double DQN, eq. 4); Wang et al. 2016
  (Dueling, eqs. 8-9); Schaul et al. 2016 (prioritised replay, importance weights, Alg. 1).
- Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT reward model, eq. 1); Plackett 1975, Luce 1959
  (the listwise ranking likelihood).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .masked import aggregate_loss, masked_mean
from .preference import plackett_luce_nll, ranked_pairs


def _expand_like(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Per-sequence advantages (B,) broadcast over the tokens of a (B, T) batch.
    while advantages.dim() < like.dim():
        advantages = advantages.unsqueeze(-1)
    return advantages


def _d(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GSPO's token-form log-ratio: log s_i,t = sg[log s_i] + log pi_t - sg[log pi_t].

    Zheng et al. 2025 (GSPO, eq. 7): s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|) = exp(mean_t (logp - old_logp)),
    the length-normalised sequence ratio; eq. 10 (GSPO-token): s_i,t = sg[s_i] pi_t / sg[pi_t] has the
    value s_i on every token of y_i and the gradient s_i grad log pi_t, so a token mean of the clipped
    surrogate over y_i is exactly GSPO's sequence objective (and clipping acts on whole sequences).

    Shapes: logp, old_logp, mask (B, T); returns (B, T) (every valid token of a row holds log s_i).
    """
    seq = masked_mean(_d(logp) - old_logp, mask, dim=-1)  # (B,) log s_i, a constant
    return seq[:, None] + logp - _d(logp)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    mode: str = "token-mean",
    level: str = "token",
    **agg,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate loss: -min(r A, clip(r, 1 - eps, 1 + eps_high) A), r = pi / pi_old.

    PPO eq. 7 (Schulman et al. 2017); ``clip_eps_high`` (default ``clip_eps``) gives DAPO's
    asymmetric clip-higher. ``clip_eps=None`` is the unclipped surrogate -r A (PPO sec. 6.1,
    "no clipping or penalty"). ``level="sequence"``: r is GSPO's length-normalised sequence ratio in
    its token form (:func:`sequence_log_ratio`, Zheng et al. 2025), clipped per sequence. Metrics:
    ``policy/clipfrac`` is :func:`clip_fraction` (0 unclipped); ``policy/approx_kl`` is the k3
    estimate of KL(old || new) on the old policy's samples.

    Shapes: logp, old_logp (B, T) or (N,); advantages (B,) or same as logp; mask like logp or None.
    """
    if level == "token":
        log_ratio = logp - old_logp
    elif level == "sequence":
        log_ratio = sequence_log_ratio(logp, old_logp, mask)
    else:
        raise ValueError(f"unknown importance-sampling level {level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _expand_like(advantages, logp)
    surr = -adv * ratio
    if clip_eps is None:
        per_token = surr
        clipfrac = masked_mean(torch.zeros_like(surr), mask)
    else:
        high = clip_eps if clip_eps_high is None else clip_eps_high
        surr_clip = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + high)
        per_token = torch.maximum(surr, surr_clip)  # max of losses = min of objectives
        clipfrac = clip_fraction(ratio, adv, clip_eps, clip_eps_high, mask)
    loss = aggregate_loss(per_token, mask, mode, **agg)
    metrics = {
        "loss/policy": _d(loss),
        "policy/clipfrac": _d(clipfrac),
        "policy/approx_kl": _d(masked_mean(kl_estimate(old_logp, logp, "k3"), mask)),
        "policy/ratio_mean": _d(masked_mean(ratio, mask)),
    }
    return loss, metrics


def clip_fraction(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of samples where PPO's clipped term is strictly the smaller objective: ``policy/clipfrac``.

    PPO eq. 7 (Schulman et al. 2017): clip(r, 1 - eps, 1 + eps_high) A < r A, i.e. r > 1 + eps_high with
    A > 0 or r < 1 - eps with A < 0; the clipped surrogate has zero gradient there. Computed as the loss
    compares its two terms, so the count is the loss's own. Every PPO-style loss and KL variant reports it.

    Shapes: ratio (B, T) or (N,); advantages (B,) or like ratio; mask like ratio or None; returns ().
    """
    ratio = ratio.detach()
    adv = _expand_like(advantages.detach(), ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + high) > -adv * ratio
    return masked_mean(clipped.to(ratio.dtype), mask)


def kl_penalty_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    kl: torch.Tensor | None = None,
    **agg,
) -> tuple[torch.Tensor, dict]:
    """PPO KL-penalised surrogate loss: -(r A - beta KL(old || new)), r = pi / pi_old.

    PPO eq. 8 (Schulman et al. 2017); also the penalised form of TRPO (Schulman et al. 2015,
    sec. 4). By default KL(old || new) is the per-sample k3 estimate on actions sampled from the
    old policy, r - 1 - log r, whose expectation and gradient are those of the exact KL. Pass
    ``kl`` (e.g. the exact per-state KL between two categoricals or Gaussians) to use it
    instead. Pair with an adaptive/fixed controller for ``beta``.

    Shapes: logp, old_logp (B, T) or (N,); advantages (B,) or like logp; kl like logp or None.
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = _expand_like(advantages, logp)
    kl_t = kl_estimate(old_logp, logp, "k3") if kl is None else kl
    per_token = -(ratio * adv - beta * kl_t)
    loss = aggregate_loss(per_token, mask, mode, **agg)
    metrics = {
        "loss/policy": _d(loss),
        "policy/approx_kl": _d(masked_mean(kl_t, mask)),
        "policy/ratio_mean": _d(masked_mean(ratio, mask)),
    }
    return loss, metrics


def policy_gradient_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    **agg,
) -> tuple[torch.Tensor, dict]:
    """Vanilla policy-gradient (REINFORCE) loss: -log pi(a|s) * A.

    Williams 1992; with A a return or an advantage (Sutton et al. 2000, policy gradient theorem).

    Shapes: logp (B, T) or (N,); advantages (B,) or like logp; mask like logp or None.
    """
    per_token = -logp * _expand_like(advantages, logp)
    loss = aggregate_loss(per_token, mask, mode, **agg)
    return loss, {"loss/policy": _d(loss)}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_eps: float | None = None,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    **agg,
) -> tuple[torch.Tensor, dict]:
    """Value regression loss 0.5 (V - R)^2, optionally clipped around the old values.

    Clipped (PPO2 baselines / Ziegler et al. 2019): V_clip = V_old + clip(V - V_old, -eps, eps),
    loss = 0.5 max((V - R)^2, (V_clip - R)^2). ``value/clipfrac`` is the fraction of tokens where
    the clipped error is strictly the larger one.

    Shapes: values, old_values, returns (B, T) or (N,); mask like values or None.
    """
    err = (values - returns) ** 2
    if clip_eps is None:
        per_token = 0.5 * err
        clipfrac = err.new_zeros(())  # nothing is clipped (skips a masked mean of zeros)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipfrac = masked_mean((err_clip > err).to(values.dtype), mask)
    loss = aggregate_loss(per_token, mask, mode, **agg)
    metrics = {
        "loss/value": _d(loss),
        "value/clipfrac": _d(clipfrac),
        "value/mean": _d(masked_mean(values, mask)),
    }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits), computed stably in float32.

    H = logsumexp(z) - sum_i softmax(z)_i z_i.

    Shapes: logits (..., V); returns (...).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_i softmax(z)_i^2, the log-probability that two draws agree, in float32: logsumexp(2z) - 2 logsumexp(z).

    Shapes: logits (..., V); returns (...).
    """
    logits = logits.float()
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``labels`` under softmax(logits): z[label] - logsumexp(z), in float32.

    Avoids materialising the full (..., V) log_softmax; the caller aligns logits and labels
    (for a causal LM: logits[:, :-1] predict labels = input_ids[:, 1:]).

    Shapes: logits (..., V), labels (...) int64; returns (...) float32.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def dqn_target(
    rewards: torch.Tensor,
    next_q_target: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float | torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-step (or n-step) Q-learning target y = r + gamma (1 - terminated) Q'(s', a*).

    DQN (Mnih et al. 2015): a* = argmax_a Q_target(s', a). Double DQN (van Hasselt et al. 2016,
    eq. 4) when ``next_q_online`` is given: a* = argmax_a Q_online(s', a), valued by Q_target.
    For n-step returns pass the n-step discounted reward sum and gamma**n (float or per-sample
    tensor). Only ``terminated`` cuts the bootstrap; truncated transitions bootstrap. No gradient.

    Shapes: rewards (B,), next_q_target (B, A), terminated (B,), gamma float or (B,),
    next_q_online (B, A) or None; returns (B,).
    """
    if next_q_online is None:
        next_v = next_q_target.max(dim=-1).values  # (B,)
    else:
        best = next_q_online.argmax(dim=-1, keepdim=True)  # (B, 1)
        next_v = next_q_target.gather(-1, best).squeeze(-1)  # (B,)
    not_done = 1 - terminated.to(next_v.dtype)
    return rewards + gamma * not_done * next_v


def dueling_q(value: torch.Tensor, advantage: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Combine dueling streams: Q = V + A - mean_a A ("mean", eq. 9) or V + A - max_a A ("max", eq. 8).

    Wang et al. 2016, "Dueling Network Architectures for Deep RL".

    Shapes: value (B, 1) or (B,), advantage (B, A); returns (B, A).
    """
    if value.dim() == advantage.dim() - 1:
        value = value.unsqueeze(-1)
    if mode == "mean":
        return value + advantage - advantage.mean(dim=-1, keepdim=True)
    if mode == "max":
        return value + advantage - advantage.max(dim=-1, keepdim=True).values
    raise ValueError(f"unknown dueling mode {mode!r}; expected 'mean' or 'max'")


def td_loss(
    q: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "huber",
    delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted TD regression loss; returns ``(loss, td_errors)``.

    loss = mean_i w_i l(delta_i), delta_i = target_i - q_i, with l the Huber loss (threshold
    ``delta``; Mnih et al. 2015 "error clipping") or 0.5 delta^2 (``"mse"``). ``weights`` are the
    importance-sampling weights omega_i of prioritised replay (Schaul et al. 2016, Alg. 1,
    already normalised by their max). ``td_errors`` are detached, for the new priorities |delta|.

    Shapes: q, target (B,), weights (B,) or None; returns (scalar loss, td_errors (B,)).
    """
    target = target.detach()
    if kind == "huber":
        per_sample = F.huber_loss(q, target, reduction="none", delta=delta)
    elif kind == "mse":
        per_sample = 0.5 * (target - q) ** 2
    else:
        raise ValueError(f"unknown td loss {kind!r}; expected 'huber' or 'mse'")
    if weights is not None:
        per_sample = weights * per_sample
    return per_sample.mean(), (target - q).detach()


def _centre_penalty(scores: torch.Tensor, center_coef: float) -> torch.Tensor:
    return center_coef * (scores**2).mean() if center_coef else scores.new_zeros(())


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Pairwise reward-model loss -log sigmoid(r_chosen - r_rejected - margin), mean over pairs.

    Bradley & Terry 1952; InstructGPT eq. 1 (Ouyang et al. 2022) with K = 2; the optional margin is
    Llama 2's (Touvron et al. 2023, eq. 2). ``center_coef`` adds center_coef * mean(r^2) over all
    scores to keep rewards centred at 0 (e.g. 0.01; TRL uses mean((r_c + r_r)^2) instead).

    Shapes: chosen, rejected (B,); margin float, (B,) or None; returns (loss, metrics).
    """
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean() + _centre_penalty(torch.cat([chosen, rejected]), center_coef)
    metrics = {
        "loss/reward": _d(loss),
        "reward/accuracy": _d((chosen > rejected).float().mean()),
        "reward/margin": _d((chosen - rejected).mean()),
        "reward/chosen_mean": _d(chosen.mean()),
        "reward/rejected_mean": _d(rejected.mean()),
    }
    return loss, metrics


def ranking_loss(
    scores: torch.Tensor,
    ranks: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
    loss_type: str = "pairwise",
) -> tuple[torch.Tensor, dict]:
    """Reward-model loss of K ranked responses per prompt: InstructGPT's mean over ordered pairs of
    -log sigmoid(s_better - s_worse - margin), or the Plackett-Luce negative log-likelihood of the ranking.

    Ouyang et al. 2022, eq. 1: all C(K, 2) comparisons of one prompt in one batch element, each
    prompt weighted equally. Exactly: for each prompt, average over the pairs (i, j) with
    ranks_i < ranks_j (ties are skipped, entries with rank < 0 are padding and skipped), then
    average over the prompts that have at least one pair. With K = 2 and no ties it equals
    :func:`bradley_terry_loss`. ``center_coef`` adds center_coef * mean(s^2) over valid scores.
    ``reward/accuracy``: per-prompt fraction of pairs ordered correctly (s_better > s_worse), averaged.

    ``loss_type="plackett_luce"`` replaces each prompt's pair mean by :func:`plackett_luce_nll` of its
    ranking (DPO appendix A.3, eq. 20, ties by Breslow's rule; no margin): the likelihood of the whole
    ranking when it was drawn as successive softmax choices, the exact model of a labeller that picks
    the best remaining response with probability proportional to exp(reward). Its terms are K - 1 choices,
    not a mean, so its scale grows with K. With K = 2 and no tie both types are the Bradley-Terry loss.

    Shapes: scores (B, K), ranks (B, K) int with 0 = best, margin float, (B,) or None; returns (loss, metrics).
    """
    if loss_type not in ("pairwise", "plackett_luce"):
        raise ValueError(f"loss_type must be pairwise or plackett_luce, got {loss_type!r}")
    if loss_type == "plackett_luce" and margin is not None:
        raise ValueError("a margin applies to pairs only, not to loss_type='plackett_luce'")
    valid = ranks >= 0  # (B, K)
    pairs = ranked_pairs(ranks).to(scores.dtype)  # (B, K, K): response i ranked better than j, both valid
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (B, K, K): s_i - s_j
    if margin is not None:
        m = torch.as_tensor(margin, dtype=scores.dtype, device=scores.device)
        diff = diff - (m.view(-1, 1, 1) if m.dim() == 1 else m)
    n_pairs = pairs.sum(dim=(1, 2))  # (B,)
    has_pairs = (n_pairs > 0).to(scores.dtype)
    n_prompts = has_pairs.sum().clamp_min(1)
    if loss_type == "plackett_luce":
        per_prompt = plackett_luce_nll(scores, ranks) * has_pairs  # (B,)
    else:
        per_prompt = (-F.logsigmoid(diff) * pairs).sum(dim=(1, 2)) / n_pairs.clamp_min(1)  # (B,)
    valid_scores = scores[valid]
    loss = per_prompt.sum() / n_prompts + _centre_penalty(valid_scores, center_coef)
    correct = ((scores.unsqueeze(2) - scores.unsqueeze(1) > 0).to(scores.dtype) * pairs).sum(dim=(1, 2))
    metrics = {
        "loss/reward": _d(loss),
        "reward/accuracy": _d((correct / n_pairs.clamp_min(1)).sum() / n_prompts),
        "reward/pairs": _d(n_pairs.sum()),
    }
    return loss, metrics
