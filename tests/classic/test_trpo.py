"""TRPO: the constrained step keeps KL <= max_kl and improves the surrogate; the dual update; errors; learning;
resume."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
import torch

from classic import trpo
from classic.policies import ActorCritic
from rlhf.runtime import ConfigError, make_config
from test_classic_ppo import CONFIGS, check_resume_is_exact


def cfg_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), progress=False, report_to="none", eval_episodes=0)
    return make_config(trpo.Config, {**base, **kw})


def toy_batch(policy, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 4, generator=g)
    with torch.no_grad():
        params = policy.params(obs)
        dist = policy.distribution(params)
        actions = dist.sample()
        logp = policy.log_prob(params, actions)
    advantages = torch.randn(n, generator=g)
    return {"obs": obs, "actions": actions, "logp": logp, "valid": torch.ones(n)}, params, advantages


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,))])
@pytest.mark.parametrize("max_kl", [0.01, 0.001])
def test_constrained_step_keeps_kl_and_improves_surrogate(tmp_path, action_space, max_kl):
    torch.manual_seed(0)
    policy = ActorCritic(gym.spaces.Box(-1, 1, (4,)), action_space)
    batch, old_params, advantages = toy_batch(policy)
    cfg = cfg_for(tmp_path, max_kl=max_kl)
    before, kl0, _ = trpo.surrogate_and_kl(policy, batch, old_params, advantages)
    critic_before = [p.clone() for p in policy.critic.parameters()]
    info = trpo.constrained_step(cfg, policy, batch, old_params, advantages)
    with torch.no_grad():
        after, kl, _ = trpo.surrogate_and_kl(policy, batch, old_params, advantages)
    assert kl0.item() == pytest.approx(0.0, abs=1e-7)
    assert info["trpo/accepted"] == 1.0
    assert after.item() > before.item()
    assert 0 < kl.item() <= max_kl
    # the step goes a fair way to the boundary (it is scaled to it, then shrunk by 0.8^k)
    assert kl.item() >= 0.8 ** 10 * max_kl * 0.5
    for p, q in zip(policy.critic.parameters(), critic_before):  # the critic is not part of the trust region
        torch.testing.assert_close(p, q)


def test_line_search_rejects_a_step_that_cannot_improve(tmp_path):
    torch.manual_seed(0)
    policy = ActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(3))
    batch, old_params, _ = toy_batch(policy)
    theta = [p.clone() for p in policy.parameters()]
    no_gain = torch.zeros(256)  # A = 0: no gain anywhere
    info = trpo.constrained_step(cfg_for(tmp_path), policy, batch, old_params, no_gain)
    assert info["trpo/accepted"] == 0.0
    for p, q in zip(policy.parameters(), theta):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("kw, option", [
    (dict(num_envs=3, num_steps=10, num_minibatches=4), "num_minibatches"),
    (dict(penalty_lr=-1.0), "penalty_lr"),
    (dict(kl_beta=-1.0), "kl_beta"),
    (dict(max_kl=0.0), "max_kl"),
    (dict(cg_damping=-0.1), "cg_damping"),
    (dict(backtrack_coef=1.5), "backtrack_coef"),
    (dict(policy="cnn"), "policy"),
    (dict(variant="exact"), "variant"),
])
def test_bad_config_names_the_option(tmp_path, kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg_for(tmp_path, **kw)
    assert not (tmp_path / "run").exists()


def test_penalty_variant_dual_update(tmp_path):
    cfg = cfg_for(tmp_path, variant="penalty", num_envs=2, num_steps=128, num_minibatches=2, total_timesteps=6 * 256,
                  penalty_lr=20.0, kl_beta=0.5, max_kl=0.005, policy_lr=0.01)
    trpo.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 6
    betas = [r["kl/beta"] for r in rows]
    assert betas[0] == 0.5
    for prev, nxt in zip(rows, rows[1:]):  # beta <- max(0, beta + alpha (KL - eps)), KL after the policy steps
        expected = max(0.0, prev["kl/beta"] + 20.0 * (prev["policy/approx_kl"] - 0.005))
        assert nxt["kl/beta"] == pytest.approx(expected, rel=1e-6)
    assert len(set(betas)) > 1


@pytest.mark.parametrize("variant", ["constrained", "penalty"])  # penalty: the multiplier beta resumes too
def test_resume_continues_exactly(tmp_path, variant):
    common = dict(num_envs=2, num_steps=64, num_minibatches=2, seed=5, eval_episodes=2, variant=variant,
                  penalty_lr=50.0)
    check_resume_is_exact(trpo, lambda **kw: cfg_for(tmp_path, **common, **kw), tmp_path, 128)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["constrained"])  # the penalty variant's update is tested above (dual update)
def test_trpo_learns_cartpole(tmp_path, variant):
    from rlhf.runtime import parse_config

    cfg = parse_config(trpo.Config, ["--config", str(CONFIGS / "trpo_cartpole.yaml"), "--total_timesteps", "30000",
                                     "--variant", variant, "--output_dir", str(tmp_path / variant),
                                     "--progress", "false", "--report_to", "none", "--seed", "1"])
    summary = trpo.train(cfg)
    assert summary["eval/return_mean"] >= 150  # seeds 1-4 reach 500 by 30k steps; a random policy scores ~22


def test_trpo_mujoco_smoke(tmp_path):
    summary = trpo.train(cfg_for(tmp_path, env_id="Hopper-v5", num_envs=1, num_steps=256, num_minibatches=4,
                                 total_timesteps=256, norm_obs=True, norm_reward=True, eval_episodes=1))
    assert summary["global_step"] == 256 and "eval/return_mean" in summary
