"""KL estimators and KL-coefficient controllers.

References:
- J. Schulman, "Approximating KL Divergence" (2020 note, http://joschu.net/blog/kl-approx.html):
  the k1, k2, k3 sample estimators.
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", section 4 (adaptive KL penalty).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2
  (proportional controller for the KL coefficient).
- Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training":
  truncated importance sampling between an inference engine and the trainer.
"""

from __future__ import annotations

import math

import torch

LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Element-wise sample estimate of KL(pi || ref) from samples x ~ pi (Schulman's KL note).

    With log-ratio d = logp - ref_logp = log pi(x) - log ref(x):
    k1 = d (unbiased, high variance, can be negative); k2 = d^2 / 2 (biased, low variance);
    k3 = exp(-d) - (-d) - 1 (unbiased, always >= 0, low variance).
    For k3 the log-ratio is clamped to [-20, 20] before ``exp`` so one outlier token cannot
    overflow to inf (exp(20) ~ 5e8); the gradient is zero beyond the clamp.

    Shapes: logp, ref_logp (...) same shape; returns (...).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        r = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(ref / pi)
        return torch.exp(r) - r - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


class FixedKLController:
    """Constant KL coefficient beta (PPO with a fixed KL penalty, Schulman et al. 2017 sec. 4)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, kl, n_steps: int = 1) -> float:
        """Keep beta; returns it. Shapes: kl is a python float or 0-d tensor."""
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """PPO-paper adaptive KL coefficient (Schulman et al. 2017, sec. 4).

    d < target / 1.5: beta /= 2;  d > target * 1.5: beta *= 2;  else unchanged.
    """

    def __init__(self, beta: float, target: float):
        super().__init__(beta)
        self.target = float(target)

    def update(self, kl, n_steps: int = 1) -> float:
        """Apply the rule once to the measured mean KL; returns the new beta. Shapes: kl scalar."""
        kl = float(kl)
        if kl < self.target / 1.5:
            self.beta /= 2
        elif kl > self.target * 1.5:
            self.beta *= 2
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target = float(state["beta"]), float(state["target"])


class ProportionalKLController(FixedKLController):
    """Proportional KL controller of Ziegler et al. 2019 (sec. 2.2).

    e = clip(kl / target - 1, -0.2, 0.2);  beta *= 1 + e * n_steps / horizon,
    where n_steps is the number of samples (or steps) since the last update.
    """

    def __init__(self, beta: float, target: float, horizon: float):
        super().__init__(beta)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl, n_steps: int = 1) -> float:
        """Move beta towards the target KL; returns the new beta. Shapes: kl scalar."""
        error = min(max(float(kl) / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.target, self.horizon = float(state["target"]), float(state["horizon"])


def kl_controller(kind: str, beta: float, target: float | None = None, horizon: float | None = None):
    """Build a KL controller from a config string: "fixed", "adaptive" or "proportional".

    Shapes: n/a (returns a controller with ``.beta``, ``.update(kl, n_steps)``, ``state_dict()``).
    """
    if kind == "fixed":
        return FixedKLController(beta)
    if kind in ("adaptive", "proportional") and target is None:
        raise ValueError(f"kl controller {kind!r} needs a target KL")
    if kind == "adaptive":
        return AdaptiveKLController(beta, target)
    if kind == "proportional":
        if horizon is None:
            raise ValueError("kl controller 'proportional' needs a horizon")
        return ProportionalKLController(beta, target, horizon)
    raise ValueError(f"unknown kl controller {kind!r}; expected 'fixed', 'adaptive' or 'proportional'")


def truncated_importance_weights(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float = 2.0, level: str = "token") -> torch.Tensor:
    """Truncated importance weights min(pi(y) / mu(y), cap) of tokens sampled from mu, for a loss under pi.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (truncated
    importance sampling, TIS): the sampler mu (an inference engine) and the trainer pi compute slightly
    different probabilities of the same tokens; weighting each token's policy-gradient term by
    min(pi / mu, C) corrects the bias this mismatch puts in the gradient, with bounded variance.
    `level="token"`: one weight per token, min(exp(logp_t - sampler_logp_t), cap) (TRL's and verl's
    token level); `level="sequence"`: one weight per completion, min(exp(sum_t mask_t (logp_t -
    sampler_logp_t)), cap), broadcast over its tokens. Constants: call on detached log-probs.

    Shapes: logp, sampler_logp, mask (B, T); returns (B, T), 0 where mask is 0.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown importance-sampling level {level!r} (token or sequence)")
    mask = mask.to(logp.dtype)
    log_ratio = (logp - sampler_logp) * mask  # (B, T)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(logp)  # (B, T)
    # clamp the log first: exp of a large log-ratio overflows before the cap could apply
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    return weights * mask
