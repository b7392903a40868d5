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
"""

from __future__ import annotations

import torch


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
