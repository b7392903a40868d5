"""Vanilla policy gradient (REINFORCE), with or without a learned value baseline.

`classic pg --env_id CartPole-v1 --baseline true`

Williams 1992: grad J = E[grad log pi(a_t|s_t) * Psi_t], one gradient step per rollout.
- `baseline=false`: Psi_t = G_t, the discounted Monte-Carlo return to the end of the episode
  (`rlhf.core.discounted_returns`; an episode still running at the end of the rollout is cut
  there, so use a long `num_steps`); no critic is trained.
- `baseline=true`: Psi_t = the GAE advantage of a critic V fitted by regression on the returns
  in the same step (Sutton et al. 2000; Schulman et al. 2016 with `gae_lambda=1` gives
  G_t - V(s_t), bootstrapped only at truncations and at the end of the rollout).
The loop: rollout -> advantages -> one Adam step -> log -> checkpoint -> evaluate.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from classic import onpolicy
from classic.nets import FUSED_ADAM, PrecisionArgs
from classic.onpolicy import OnPolicyArgs
from rlhf.core import masked_mean, masked_whiten, policy_gradient_loss, value_loss
from rlhf.runtime import RunConfig, arg, check


@dataclasses.dataclass
class Config(OnPolicyArgs, PrecisionArgs, RunConfig):
    """Vanilla policy gradient (REINFORCE), with or without a value baseline."""

    output_dir: str = arg("runs/pg", "Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/.")
    num_steps: int = arg(512, "Steps per environment in each rollout (the horizon T); batch = num_envs * num_steps.")
    learning_rate: float = arg(3e-3, "Adam learning rate (policy and baseline).")
    gae_lambda: float = arg(1.0, "GAE lambda of the baseline's advantages (1: Monte-Carlo return minus V(s)).")
    anneal_lr: bool = arg(False, "Linearly anneal the learning rate to 0 over training.")
    baseline: bool = arg(True, "Subtract a learned value baseline V(s) (advantage actor-critic) from the return.")
    vf_coef: float = arg(0.5, "Weight of the baseline's regression loss (with baseline).")
    ent_coef: float = arg(0.0, "Entropy bonus coefficient.")

    def __post_init__(self):
        super().__post_init__()
        check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")
        check(self.ent_coef >= 0, "ent_coef", f"must be >= 0, got {self.ent_coef}")


def update(cfg: Config, policy, optimizer, batch: dict) -> dict:
    """One gradient step on -log pi(a|s) Psi (+ vf_coef * value loss - ent_coef * entropy)."""
    valid = batch["valid"]  # (B,) 0 on autoreset steps
    params, values = policy.params_and_value(batch["obs"])
    logp = policy.log_prob(params, batch["actions"])  # (B,)
    advantages = batch["advantages"]
    if cfg.norm_adv:
        advantages = masked_whiten(advantages, valid)
    pg_loss, metrics = policy_gradient_loss(logp, advantages, mask=valid)
    entropy = masked_mean(policy.entropy(params), valid)
    loss = pg_loss - cfg.ent_coef * entropy
    if cfg.baseline:
        v_loss, v_metrics = value_loss(values, batch["values"], batch["returns"], mask=valid)
        loss = loss + cfg.vf_coef * v_loss
        metrics.update(v_metrics)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm:
        nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    with torch.no_grad():  # how far the step moved pi
        metrics["policy/approx_kl"] = masked_mean(policy.kl(params.detach(), policy.params(batch["obs"])), valid)
    return {**metrics, "policy/entropy": entropy.detach()}


def train(cfg: Config) -> dict:
    loop = onpolicy.Loop(cfg, "pg")
    policy = loop.policy
    trainable = policy.parameters() if cfg.baseline else policy.actor_parameters()
    optimizer = torch.optim.Adam(trainable, lr=cfg.learning_rate, eps=1e-5, fused=FUSED_ADAM)
    loop.open(optimizer=optimizer)
    # rollout -> returns / advantages -> one policy-gradient step -> log, evaluate, checkpoint
    for batch in loop.rollouts(optimizer, gae=cfg.baseline):
        metrics = update(cfg, policy, optimizer, batch)
        loop.end_iteration({**metrics, "kl/beta": 0.0}, value_trained=cfg.baseline)  # else no explained variance
    return loop.finish()
