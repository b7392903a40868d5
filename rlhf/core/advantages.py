"""Advantage and return estimators: GAE, discounted returns, group-relative advantages.

References:
- Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (GAE), eqs. 11-16.
- Truncation vs termination: a time-limit truncation is not a terminal state, so it bootstraps
  from the value of the final observation (Pardo et al. 2018, "Time Limits in RL";
  Stable-Baselines3 issue #633).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": the KL-penalised
  per-token reward.
- Shao et al. 2024, "DeepSeekMath" (GRPO), section 4.1.2: outcome supervision advantages;
  Liu et al. 2025 (Dr. GRPO): no std normalisation.
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO, eq. 6);
  Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free").
- Hu 2025, "REINFORCE++" (sec. 3: the KL-penalised token reward, its return, whitened over the batch).
- Li et al. 2023, "ReMax" (Algorithm 1: the greedy completion's reward as the baseline).
- Yu et al. 2025, "DAPO": dynamic sampling (eq. 11's constraint 0 < |{correct}| < G) and the
  overlong soft punishment (eq. 13).
"""

from __future__ import annotations

import torch

from .masked import masked_whiten


def _f(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, device=like.device).to(like.dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over a rollout; time is dim 0.

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1},   returns_t = A_t + values_t
    (Schulman et al. 2015, eq. 16 in recursive form.)

    ``next_values[t]`` is V(s_{t+1}), the value of the observation reached after step t, *before*
    any auto-reset: for a truncated step (``episode_end=1, terminated=0``) it is the value of the
    final observation, which is bootstrapped; for a terminated step it is ignored.
    ``episode_end = terminated | truncated`` stops the recursion at episode boundaries.
    ``next_values`` at the last step of the rollout bootstraps the unfinished episode.
    No gradient flows if the inputs are detached (they normally are).

    Shapes: all inputs (T,) or (T, N) for N parallel envs; returns (advantages, returns), same shape.
    """
    terminated = _f(terminated, rewards)
    episode_end = _f(episode_end, rewards)
    T = rewards.shape[0]
    # Everything but the recursion at once; the loop then costs 2 small ops per step (it is
    # run per rollout on T ~ 2048 steps, where per-op dispatch, not arithmetic, is the cost).
    deltas = (rewards + gamma * (1 - terminated) * next_values - values).unbind(0)  # T x (...)
    coefs = (gamma * lam * (1 - episode_end)).unbind(0)
    last = torch.zeros_like(rewards[0])
    advantages = [None] * T
    for t in reversed(range(T)):
        last = deltas[t] + coefs[t] * last
        advantages[t] = last
    advantages = torch.stack(advantages)  # (T, ...)
    return advantages, advantages + values


def token_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over right-padded language-model completions, one episode per row.

    Each row is one episode whose steps are the generated tokens; the episode terminates after
    its last valid token (value 0 beyond it). Rewards are usually 0 except the score (and the
    per-token KL penalty) - that is the caller's choice. Padding gets advantage and return 0.
    Same recursion as :func:`gae` (Schulman et al. 2015), as in Ziegler et al. 2019 / Ouyang et al. 2022.

    Shapes: rewards, values, mask (B, T), mask right-padded (1 then 0); returns (advantages, returns) (B, T).
    """
    m = mask.to(rewards.dtype)
    values = values * m
    next_mask = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)  # (B, T)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_mask
    done = 1 - next_mask  # the last valid token (and padding) ends the episode
    adv, _ = gae((rewards * m).T, values.T, next_values.T, done.T, done.T, gamma, lam)
    adv = adv.T * m  # (B, T)
    return adv, (adv + values) * m


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards of a completion: r_t = -beta * KL_t, plus the sequence score on its last token.

    The KL-penalised reward of Ziegler et al. 2019 (eq. 2; Stiennon et al. 2020, eq. 1) spread over
    the tokens, as the input of :func:`token_gae`. A row without tokens gets no score.

    Shapes: scores (B,), kl (B, T), mask (B, T) right-padded; returns (B, T), 0 on padding.
    """
    rewards = -beta * kl * mask
    last = (mask.sum(1) - 1).clamp_min(0)  # (B,) index of the last token: EOS, or where the cut fell
    has_tokens = (mask.sum(1) > 0).to(rewards.dtype)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores * has_tokens
    return rewards


def discounted_returns(
    rewards: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    bootstrap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monte-Carlo discounted return-to-go G_t = r_t + gamma * (1 - episode_end_t) * G_{t+1}.

    ``bootstrap`` is V(s_T) for the episode left unfinished at the end of the rollout (0 if None).
    Episodes that end inside the rollout do not bootstrap, truncated or not (REINFORCE, Williams
    1992; Sutton & Barto eq. 3.9); for bootstrapped truncation use :func:`gae` with lam=1, whose
    returns are discounted returns that bootstrap from ``next_values``.

    Shapes: rewards, episode_end (T,) or (T, N); bootstrap (), (N,) or None; returns (T,) or (T, N).
    """
    episode_end = _f(episode_end, rewards)
    g = torch.zeros_like(rewards[0]) if bootstrap is None else _f(bootstrap, rewards).expand_as(rewards[0])
    out = [None] * rewards.shape[0]
    for t in reversed(range(rewards.shape[0])):
        g = rewards[t] + gamma * (1 - episode_end[t]) * g
        out[t] = g
    return torch.stack(out)


def group_stats(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased std and count of the valid rewards of each group (invalid entries are ignored).

    A group with one valid entry has std 0; a group with none has mean 0 and std 0. Values at
    invalid entries may be anything, NaN included.

    Shapes: rewards, valid (B * G,) with G = group_size consecutive entries per prompt
    (valid bool, None: all valid); returns mean, std, count (B,).
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    m = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    count = m.sum(1).to(rewards.dtype)  # (B,)
    x = torch.where(m, grouped, torch.zeros_like(grouped))
    mean = x.sum(1) / count.clamp_min(1)
    sq = torch.where(m, (grouped - mean[:, None]) ** 2, torch.zeros_like(grouped)).sum(1)
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    return mean, std, count


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages: subtract each prompt's mean reward, divide by a std.

    A_i = (r_i - mean(group)) / (std + eps) with std the group's (``"group"``, GRPO: Shao et al.
    2024, section 4.1.2), the whole batch's (``"batch"``), or none (``"none"``: std := 1 and no
    eps, Dr. GRPO: Liu et al. 2025). Stds are unbiased (torch.std); a group of one has advantage 0.

    ``valid`` (bool, None: all valid) marks the rewards to use: means and stds are over valid
    entries only, and an invalid entry (e.g. a reward function that failed on it) gets advantage 0,
    so a made-up placeholder reward never moves the advantages of the others.

    Shapes: rewards, valid (B * G,) with G = group_size consecutive entries per prompt; returns (B * G,).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat (B * group_size,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the number of rewards ({rewards.numel()})"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    if valid is not None and not bool(valid.all()):
        return _masked_group_advantages(rewards, group_size, scale, eps, valid.bool())
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B * G,)
    correction = 1 if group_size > 1 else 0
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True, correction=correction).expand_as(grouped).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        std = rewards.std(correction=1 if rewards.numel() > 1 else 0)
        return centred / (std + eps)
    return centred


def _masked_group_advantages(rewards, group_size, scale, eps, valid) -> torch.Tensor:
    # Same formulas as above over valid entries only (the all-valid path stays on torch.std).
    mean, std, _ = group_stats(rewards, group_size, valid)  # (B,)
    centred = rewards - mean.repeat_interleave(group_size)  # (B * G,)
    if scale == "group":
        centred = centred / (std.repeat_interleave(group_size) + eps)
    elif scale == "batch":
        _, batch_std, _ = group_stats(rewards, rewards.numel(), valid)
        centred = centred / (batch_std + eps)
    return torch.where(valid, centred, torch.zeros_like(centred))


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out advantages: A_i = r_i - mean of the other valid rewards of its group.

    RLOO (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): the baseline of each sample is the mean of
    the group's other k - 1 samples, so it does not depend on the sample itself (unbiased), and
    A_i = k / (k - 1) (r_i - mean). An invalid entry, or a group with fewer than 2 valid entries, gets 0.

    Shapes: rewards, valid (B * G,) with G = group_size consecutive entries per prompt; returns (B * G,).
    """
    mean, _, count = group_stats(rewards, group_size, valid)  # (B,)
    count = count.repeat_interleave(group_size)
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    loo = (rewards - mean.repeat_interleave(group_size)) * count / (count - 1).clamp_min(1)
    return torch.where(valid & (count > 1), loo, torch.zeros_like(loo))


def baseline_advantages(rewards: torch.Tensor, baselines: torch.Tensor, group_size: int,
                        valid: torch.Tensor | None = None, baseline_valid: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = r_i - b(prompt of i): one baseline per prompt, e.g. ReMax's greedy reward.

    ReMax (Li et al. 2023, Algorithm 1): b is the reward of the policy's greedy completion of the same
    prompt. An invalid entry, or every entry of a prompt whose baseline is invalid, gets 0.

    Shapes: rewards, valid (B * G,) prompt-major; baselines, baseline_valid (B,); returns (B * G,).
    """
    out = rewards - baselines.repeat_interleave(group_size)
    keep = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    if baseline_valid is not None:
        keep = keep & baseline_valid.bool().repeat_interleave(group_size)
    return torch.where(keep, out, torch.zeros_like(out))


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            all_reduce=None) -> torch.Tensor:
    """REINFORCE++ token advantages: whitened returns of the KL-penalised token rewards (Hu 2025, sec. 3).

    r_t = -beta KL_t (+ the score on the last token, :func:`per_token_rewards`); the return
    G_t = sum_{s >= t} r_s (no discount, no critic); A = (G - mean) / std over every valid token of
    the batch (``all_reduce`` sums over processes, so the statistics are the global batch's).

    Shapes: scores (B,), kl, mask (B, T) right-padded; returns (B, T), 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = per_token_rewards(scores, kl, mask.long(), beta)  # (B, T)
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * m  # reverse cumulative sum: the return-to-go
    return masked_whiten(returns, m, all_reduce=all_reduce)


def informative_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Groups whose valid rewards are not all equal: DAPO's dynamic-sampling filter (Yu et al. 2025, eq. 11).

    A group whose rewards all agree has zero group-relative advantage and teaches nothing; DAPO drops it
    and samples more prompts. A group with fewer than 2 valid rewards is not informative either.

    Shapes: rewards, valid (B * G,) prompt-major; returns (B,) bool.
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    m = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    big = torch.finfo(rewards.dtype).max
    high = torch.where(m, grouped, torch.full_like(grouped, -big)).max(1).values
    low = torch.where(m, grouped, torch.full_like(grouped, big)).min(1).values
    return (m.sum(1) > 1) & (high > low)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times ``penalty``.

    0 for |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache, a linear ramp from 0 to -1 over
    the last L_cache tokens, for L_max - L_cache < |y| <= L_max; -1 beyond (L_max = ``max_len``,
    L_cache = ``buffer_len``; 0 turns it off).

    Shapes: lengths (B,) completion lengths in tokens; returns (B,) float.
    """
    lengths = lengths.float()
    if buffer_len <= 0:
        return torch.zeros_like(lengths)
    free = max_len - buffer_len
    ramp = ((free - lengths) / buffer_len).clamp(min=-1.0, max=0.0)
    return penalty * torch.where(lengths > max_len, torch.full_like(lengths, -1.0), ramp)
