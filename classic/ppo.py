"""PPO on gymnasium environments: clipped surrogate, adaptive KL penalty, fixed KL penalty, or neither.

`classic ppo --env_id Hopper-v5 --config configs/classic/ppo_hopper.yaml`

Schulman et al. 2017, "Proximal Policy Optimization Algorithms":
- `penalty=clip`:        L = E[min(r A, clip(r, 1 - eps, 1 + eps) A)]                      (eq. 7)
- `penalty=adaptive_kl`: L = E[r A - beta KL(pi_old || pi)], after each rollout's epochs
                         d < kl_target / 1.5: beta /= 2; d > kl_target * 1.5: beta *= 2    (eq. 8, sec. 4)
- `penalty=fixed_kl`:    the same with a constant beta = kl_beta
- `penalty=none`:        L = E[r A]                                                         (sec. 6.1)
with r = pi(a|s) / pi_old(a|s), the exact per-state KL of the categorical / Gaussian policies,
a value loss and an entropy bonus (eq. 9), GAE advantages (Schulman et al. 2016) and Adam over
`update_epochs` passes of `num_minibatches` minibatches. The loop: rollout -> advantages ->
update -> log -> checkpoint -> evaluate. Implementation details follow CleanRL's
`ppo_continuous_action.py` and Huang et al. 2022, "The 37 Implementation Details of PPO";
truncated episodes bootstrap (classic/onpolicy.py). `--compile true` runs `minibatch_loss` and its
backward pass through torch.compile: for the small MLPs of classic control and MuJoCo the update is
torch's per-op overhead, which fused kernels remove (same math; float rounding may differ).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from classic import onpolicy
from classic.nets import FUSED_ADAM, PrecisionArgs, adam_step, clip_grad_norm
from classic.onpolicy import OnPolicyArgs
from classic.policies import ActorCritic
from rlhf.core import (AdaptiveKLController, FixedKLController, clip_fraction, kl_penalty_loss, masked_mean,
                       masked_whiten, ppo_clip_loss, value_loss)
from rlhf.runtime import RunConfig, arg, check

PENALTIES = ("clip", "adaptive_kl", "fixed_kl", "none")
CXX_COMPILERS = tuple(filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))  # what inductor can build with


@dataclasses.dataclass
class Config(OnPolicyArgs, PrecisionArgs, RunConfig):
    """PPO: clip, adaptive KL penalty, fixed KL penalty, or no clip."""

    output_dir: str = arg("runs/ppo", "Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/.")
    penalty: str = arg("clip", "Surrogate: clip (L^CLIP), adaptive_kl / fixed_kl (L^KLPEN), none (L^CPI, no clip or "
                               "penalty).", choices=PENALTIES)
    clip_eps: float = arg(0.2, "Clip range epsilon of L^CLIP (also of the value loss with clip_vloss).")
    kl_target: float = arg(0.01, "adaptive_kl: target KL d_targ of the adaptive beta rule.")
    kl_beta: float = arg(1.0, "KL penalty coefficient: the constant beta of fixed_kl, the initial beta of adaptive_kl.")
    update_epochs: int = arg(4, "Passes over each rollout.")
    num_minibatches: int = arg(4, "Minibatches per pass; must divide num_envs * num_steps.")
    clip_vloss: bool = arg(True, "Clip the value loss around the rollout's values (by clip_eps).")
    ent_coef: float = arg(0.0, "Entropy bonus coefficient.")
    vf_coef: float = arg(0.5, "Value loss coefficient.")
    target_kl: float | None = arg(None, "Stop a rollout's epochs once the approximate KL exceeds this (none: never).")
    compile: bool = arg(False, "torch.compile the minibatch loss and its backward pass (fused kernels instead of "
                               "dozens of tiny ops: faster updates for small MLPs) after a one-time compile at the "
                               "first update; on CPU this needs a C++ compiler.")

    def __post_init__(self):
        super().__post_init__()
        check(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")
        check(self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        check(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        check(self.update_epochs >= 1, "update_epochs", f"must be >= 1, got {self.update_epochs}")
        check(self.num_minibatches >= 1, "num_minibatches", f"must be >= 1, got {self.num_minibatches}")
        check(self.batch_size % self.num_minibatches == 0, "num_minibatches",
              f"{self.num_minibatches} does not divide the batch num_envs * num_steps = {self.batch_size}")
        check(self.ent_coef >= 0, "ent_coef", f"must be >= 0, got {self.ent_coef}")
        check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")
        check(self.target_kl is None or self.target_kl > 0, "target_kl", f"must be > 0 or none, got {self.target_kl}")
        check(not self.compile or not self.device.startswith("cpu") or any(map(shutil.which, CXX_COMPILERS)), "compile",
              f"torch.compile on CPU needs a C++ compiler ({', '.join(CXX_COMPILERS)}) and none is on PATH")


def make_controller(cfg: Config):
    """The beta of the KL-penalised surrogates (None for clip / none)."""
    if cfg.penalty == "adaptive_kl":
        return AdaptiveKLController(cfg.kl_beta, cfg.kl_target)
    if cfg.penalty == "fixed_kl":
        return FixedKLController(cfg.kl_beta)
    return None


def policy_loss(cfg: Config, logp, old_logp, advantages, valid, kl, beta):
    """The surrogate of `cfg.penalty` as a loss to minimise, via rlhf.core. Shapes: all (B,)."""
    if cfg.penalty == "clip":
        return ppo_clip_loss(logp, old_logp, advantages, mask=valid, clip_eps=cfg.clip_eps)
    if cfg.penalty == "none":
        return ppo_clip_loss(logp, old_logp, advantages, mask=valid, clip_eps=None)
    return kl_penalty_loss(logp, old_logp, advantages, beta, mask=valid, kl=kl)


def minibatch_loss(cfg: Config, policy: ActorCritic, mb: dict, beta: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The PPO loss of one minibatch (eq. 9: surrogate, value loss, entropy bonus) and its metrics.

    The only part of the update that `compile` hands to torch.compile. Tensors in, tensors out (beta
    too: a float would be baked into the compiled graph and recompiled whenever the adaptive rule moves it).
    Shapes: every field of `mb` (b, ...), loss ().
    """
    valid = mb["valid"]  # (b,) 0 on autoreset steps
    params, values = policy.params_and_value(mb["obs"])
    logp = policy.log_prob(params, mb["actions"])  # (b,)
    advantages = masked_whiten(mb["advantages"], valid) if cfg.norm_adv else mb["advantages"]
    kl = policy.kl(mb["old_params"], params) if "old_params" in mb else None
    pg_loss, metrics = policy_loss(cfg, logp, mb["logp"], advantages, valid, kl, beta)
    v_clip = cfg.clip_eps if cfg.clip_vloss else None
    v_loss, v_metrics = value_loss(values, mb["values"], mb["returns"], clip_eps=v_clip, mask=valid)
    if cfg.ent_coef:
        entropy = masked_mean(policy.entropy(params), valid)
        loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
    else:  # entropy is only a metric: keep it out of the autograd graph (same loss, a shorter backward pass)
        with torch.no_grad():
            entropy = masked_mean(policy.entropy(params), valid)
        loss = pg_loss + cfg.vf_coef * v_loss
    if "policy/clipfrac" not in metrics:  # KL variants: how often clip_eps would have clipped, for comparison
        metrics["policy/clipfrac"] = clip_fraction((logp - mb["logp"]).exp(), advantages, cfg.clip_eps, mask=valid)
    return loss, {**metrics, **v_metrics, "policy/entropy": entropy.detach()}


def update(cfg: Config, policy: ActorCritic, optimizer: torch.optim.Optimizer, batch: dict, beta: float,
           loss_fn=minibatch_loss) -> dict:
    """`update_epochs` passes of minibatch Adam on the PPO loss (eq. 9); returns metrics averaged over the
    minibatches plus the exact mean KL(pi_old || pi) over the whole batch after the update (for the adaptive rule).
    `loss_fn`: `minibatch_loss` or its torch.compile'd twin."""
    n = batch["logp"].shape[0]
    mb_size = n // cfg.num_minibatches
    with torch.no_grad():
        old_params = policy.params(batch["obs"])  # (B, P): pi_old, exactly the rollout's policy
    use_kl = cfg.penalty in ("adaptive_kl", "fixed_kl")
    data = {**batch, "old_params": old_params} if use_kl else batch  # pi_old's params only feed the exact KL
    beta = torch.tensor(beta, dtype=torch.float32, device=old_params.device)
    trainable = list(policy.parameters())  # listed once, not per minibatch
    history = []
    for _ in range(cfg.update_epochs):
        perm = torch.randperm(n, device=batch["logp"].device)
        # one gather per epoch, and the minibatches as views (one split per field, not a slice per minibatch)
        chunks = {k: v[perm].split(mb_size) for k, v in data.items()}
        for i in range(n // mb_size):
            loss, metrics = loss_fn(cfg, policy, {k: v[i] for k, v in chunks.items()}, beta)
            for p in trainable:  # = optimizer.zero_grad(set_to_none=True), without its profiler-hook overhead
                p.grad = None
            loss.backward()
            if cfg.max_grad_norm:
                clip_grad_norm(trainable, cfg.max_grad_norm)
            adam_step(optimizer)
            history.append(metrics)
        if cfg.target_kl is not None and float(metrics["policy/approx_kl"]) > cfg.target_kl:
            break
    out = {k: torch.stack([h[k] for h in history]).mean() for k in history[0]}
    with torch.no_grad():
        out["policy/kl"] = masked_mean(policy.kl(old_params, policy.params(batch["obs"])), batch["valid"])
    return out


def train(cfg: Config) -> dict:
    loop = onpolicy.Loop(cfg, "ppo")
    optimizer = torch.optim.Adam(loop.policy.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=FUSED_ADAM)
    controller = make_controller(cfg)
    loss_fn = torch.compile(minibatch_loss, dynamic=False) if cfg.compile else minibatch_loss  # compiled at first use
    loop.open(optimizer=optimizer, controller=controller)
    for batch in loop.rollouts(optimizer):  # rollout -> advantages -> update -> log, evaluate, checkpoint
        # the KL coefficient adapts once per rollout, after the epochs (PPO paper, sec. 4)
        beta = controller.beta if controller is not None else 0.0
        metrics = update(cfg, loop.policy, optimizer, batch, beta, loss_fn)
        if controller is not None:
            controller.update(float(metrics["policy/kl"]))
        loop.end_iteration({**metrics, "kl/beta": beta, "train/lr": optimizer.param_groups[0]["lr"]})
    return loop.finish()
