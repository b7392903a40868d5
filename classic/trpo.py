"""TRPO on gymnasium environments: the KL-constrained natural-gradient step, or the KL-penalised form.

`classic trpo --env_id Hopper-v5 --config configs/classic/trpo_hopper.yaml`

Schulman et al. 2015, "Trust Region Policy Optimization". With r = pi(a|s) / pi_old(a|s) and
L(theta) = E[r A] the surrogate (sec. 3):
- `variant=constrained`: maximise L subject to E_s[KL(pi_old || pi)] <= max_kl (sec. 6, appendix C):
  the natural-gradient direction s = F^-1 g by conjugate gradient on Fisher-vector products
  (F = Hessian of the mean KL, plus cg_damping), scaled to the constraint's boundary
  beta = sqrt(2 max_kl / s^T F s), then backtracking (backtrack_coef^k, k < line_search_steps)
  until L improves and the KL holds. Every step goes through `rlhf.core.trust_region`.
- `variant=penalty`: maximise L - beta (KL - max_kl) with `penalty_steps` Adam steps per rollout,
  then the dual update beta <- max(0, beta + penalty_lr (KL - max_kl)) (`rlhf.core.kl_dual_update`;
  the KL-penalised form in ../shared/reference/deep_rl_lecture.txt, a Lagrangian relaxation of the
  constraint). beta, the multiplier of the KL, starts at `kl_beta` and is logged as `kl/beta`.
The value function is fitted separately by Adam (`vf_iters` passes of `num_minibatches`
minibatches) after the policy step, on GAE returns (Schulman et al. 2016). Policies: MLP only
(the trust region is over the actor's parameters, which a shared CNN torso would mix with the critic).
"""

from __future__ import annotations

import dataclasses

import torch

from classic import onpolicy
from classic.nets import FUSED_ADAM, PrecisionArgs, adam_step
from classic.onpolicy import OnPolicyArgs
from rlhf.core import (backtracking_line_search, conjugate_gradient, fisher_vector_product, flat_grad, flat_params,
                       kl_dual_update, kl_penalty_loss, masked_mean, masked_whiten, ppo_clip_loss, set_flat_params,
                       trpo_step_size, value_loss)
from rlhf.runtime import RunConfig, arg, check


@dataclasses.dataclass
class Config(OnPolicyArgs, PrecisionArgs, RunConfig):
    """TRPO: KL-constrained natural gradient, or KL-penalised with a dual update."""

    output_dir: str = arg("runs/trpo", "Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/.")
    num_steps: int = arg(512, "Steps per environment in each rollout (the horizon T); batch = num_envs * num_steps.")
    learning_rate: float = arg(1e-3, "Adam learning rate of the value function.")
    anneal_lr: bool = arg(False, "Linearly anneal the value function's learning rate to 0 over training.")
    variant: str = arg("constrained", "constrained: natural gradient + line search under KL <= max_kl; penalty: "
                                      "surrogate - beta (KL - max_kl) with a dual update of beta.",
                       choices=("constrained", "penalty"))
    max_kl: float = arg(0.01, "Trust-region size delta: the bound on the mean KL(pi_old || pi) (constrained), its "
                              "target (penalty).")
    cg_iters: int = arg(10, "Conjugate-gradient iterations for the natural-gradient direction.")
    cg_damping: float = arg(0.1, "Damping added to the Fisher matrix: (F + damping I) v.")
    line_search_steps: int = arg(10, "Backtracking line-search steps at most.")
    backtrack_coef: float = arg(0.8, "Step shrink factor per backtracking step.")
    penalty_lr: float = arg(10.0, "penalty: step size alpha of the dual update beta <- max(0, beta + alpha (KL - "
                                  "max_kl)).")
    kl_beta: float = arg(1.0, "penalty: initial KL multiplier beta (the dual variable of the KL constraint).")
    penalty_steps: int = arg(20, "penalty: full-batch Adam steps on the penalised surrogate per rollout.")
    policy_lr: float = arg(3e-3, "penalty: Adam learning rate of the policy.")
    vf_iters: int = arg(5, "Passes of the value function over each rollout.")
    num_minibatches: int = arg(8, "Minibatches per value-function pass; must divide num_envs * num_steps.")

    def __post_init__(self):
        super().__post_init__()
        check(self.max_kl > 0, "max_kl", f"must be > 0, got {self.max_kl}")
        check(self.cg_iters >= 1, "cg_iters", f"must be >= 1, got {self.cg_iters}")
        check(self.cg_damping >= 0, "cg_damping", f"must be >= 0, got {self.cg_damping}")
        check(self.line_search_steps >= 1, "line_search_steps", f"must be >= 1, got {self.line_search_steps}")
        check(0 < self.backtrack_coef < 1, "backtrack_coef", f"must be in (0, 1), got {self.backtrack_coef}")
        check(self.penalty_lr >= 0, "penalty_lr", f"must be >= 0, got {self.penalty_lr}")
        check(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        check(self.penalty_steps >= 1, "penalty_steps", f"must be >= 1, got {self.penalty_steps}")
        check(self.policy_lr > 0, "policy_lr", f"must be > 0, got {self.policy_lr}")
        check(self.vf_iters >= 1, "vf_iters", f"must be >= 1, got {self.vf_iters}")
        check(self.num_minibatches >= 1, "num_minibatches", f"must be >= 1, got {self.num_minibatches}")
        check(self.batch_size % self.num_minibatches == 0, "num_minibatches",
              f"{self.num_minibatches} does not divide the batch num_envs * num_steps = {self.batch_size}")
        check(self.policy != "cnn", "policy", "TRPO supports mlp policies only (a shared CNN torso mixes actor and "
                                              "critic parameters)")


def surrogate_and_kl(policy, batch: dict, old_params: torch.Tensor, advantages: torch.Tensor):
    """L(theta) = E[r A] (via rlhf.core.ppo_clip_loss with no clipping) and the exact mean KL(pi_old || pi_theta)."""
    params = policy.params(batch["obs"])  # (B, P)
    logp = policy.log_prob(params, batch["actions"])  # (B,)
    loss, metrics = ppo_clip_loss(logp, batch["logp"], advantages, mask=batch["valid"], clip_eps=None)
    kl = masked_mean(policy.kl(old_params, params), batch["valid"])
    return -loss, kl, params


def constrained_step(cfg: Config, policy, batch: dict, old_params: torch.Tensor, advantages: torch.Tensor) -> dict:
    """One natural-gradient step under the KL constraint (TRPO, appendix C); returns metrics."""
    actor = policy.actor_parameters()  # the trust region is over pi's parameters; the critic is fitted apart
    surrogate, _, _ = surrogate_and_kl(policy, batch, old_params, advantages)
    g = flat_grad(surrogate, actor)  # (P,) gradient of the surrogate at theta_old

    def mean_kl():  # at theta_old its Hessian is the Fisher matrix
        return masked_mean(policy.kl(old_params, policy.params(batch["obs"])), batch["valid"])

    def fvp(v):
        return fisher_vector_product(mean_kl, actor, v, damping=cfg.cg_damping)

    step_dir = conjugate_gradient(fvp, g, iters=cfg.cg_iters)  # (P,) ~ F^-1 g
    fullstep = trpo_step_size(step_dir, fvp(step_dir), cfg.max_kl) * step_dir
    theta_old, surrogate_old = flat_params(actor), surrogate.item()

    def evaluate(step):
        set_flat_params(actor, theta_old + step)
        new_surrogate, kl, _ = surrogate_and_kl(policy, batch, old_params, advantages)
        return float(new_surrogate) - surrogate_old, float(kl)

    step, info = backtracking_line_search(evaluate, fullstep, max_kl=cfg.max_kl, max_backtracks=cfg.line_search_steps,
                                          backtrack_coef=cfg.backtrack_coef, expected_improve=float(g @ fullstep))
    set_flat_params(actor, theta_old + step)  # zero step if the line search failed
    return {"trpo/accepted": float(info["accepted"]), "trpo/step_frac": info["step_frac"],
            "trpo/improvement": info["improvement"], "trpo/backtracks": float(info["backtracks"])}


def penalty_step(cfg: Config, policy, optimizer, batch: dict, old_params: torch.Tensor, advantages: torch.Tensor,
                 beta: float) -> dict:
    """`penalty_steps` Adam steps on -(E[r A] - beta KL(pi_old || pi)) (rlhf.core.kl_penalty_loss with the exact KL)."""
    for _ in range(cfg.penalty_steps):
        params = policy.params(batch["obs"])  # (B, P)
        logp = policy.log_prob(params, batch["actions"])
        kl = policy.kl(old_params, params)  # (B,) exact
        loss, _ = kl_penalty_loss(logp, batch["logp"], advantages, beta, mask=batch["valid"], kl=kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(policy.actor_parameters(), cfg.max_grad_norm)
        optimizer.step()
    return {}


def fit_value(cfg: Config, policy, optimizer, batch: dict) -> dict:
    """`vf_iters` passes of minibatch Adam on 0.5 (V(s) - R)^2."""
    n = batch["returns"].shape[0]
    for _ in range(cfg.vf_iters):
        for idx in torch.randperm(n).split(n // cfg.num_minibatches):
            v_loss, metrics = value_loss(policy.value(batch["obs"][idx]), batch["values"][idx], batch["returns"][idx],
                                         mask=batch["valid"][idx])
            optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(policy.critic.parameters(), cfg.max_grad_norm)
            adam_step(optimizer)
    return metrics


def train(cfg: Config) -> dict:
    loop = onpolicy.Loop(cfg, "trpo", cnn_ok=False)
    policy = loop.policy
    vf_optimizer = torch.optim.Adam(policy.critic.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=FUSED_ADAM)
    pi_optimizer = torch.optim.Adam(policy.actor_parameters(), lr=cfg.policy_lr, eps=1e-5)  # penalty variant only
    beta = loop.open(vf_optimizer=vf_optimizer, pi_optimizer=pi_optimizer, kl_beta=cfg.kl_beta)["kl_beta"]
    for batch in loop.rollouts(vf_optimizer):  # rollout -> advantages -> policy step -> value function -> log, ...
        advantages = masked_whiten(batch["advantages"], batch["valid"]) if cfg.norm_adv else batch["advantages"]
        with torch.no_grad():
            old_params = policy.params(batch["obs"])  # (B, P): pi_old
            surrogate_before, _, _ = surrogate_and_kl(policy, batch, old_params, advantages)
        if cfg.variant == "constrained":
            metrics = constrained_step(cfg, policy, batch, old_params, advantages)
        else:
            metrics = penalty_step(cfg, policy, pi_optimizer, batch, old_params, advantages, beta)
        with torch.no_grad():
            surrogate_after, kl, params = surrogate_and_kl(policy, batch, old_params, advantages)
            entropy = masked_mean(policy.entropy(params), batch["valid"])
        metrics.update(fit_value(cfg, policy, vf_optimizer, batch))
        metrics.update({"loss/policy": -surrogate_after, "trpo/surrogate_gain": surrogate_after - surrogate_before,
                        "policy/approx_kl": kl, "policy/entropy": entropy,
                        "kl/beta": beta if cfg.variant == "penalty" else 0.0})
        if cfg.variant == "penalty":  # dual ascent on the multiplier of the KL constraint, with the KL after the step
            beta = kl_dual_update(beta, float(kl), cfg.max_kl, cfg.penalty_lr)
        loop.end_iteration(metrics, kl_beta=beta)
    return loop.finish()
