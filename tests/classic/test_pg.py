"""Vanilla policy gradient: the loss against hand numbers, errors, learning with and without a baseline, resume."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from classic import pg
from classic.policies import ActorCritic
from rlhf.runtime import ConfigError, make_config, parse_config
from test_classic_ppo import CONFIGS, check_resume_is_exact


def cfg_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), progress=False, report_to="none", eval_episodes=0)
    return make_config(pg.Config, {**base, **kw})


@pytest.mark.parametrize("baseline", [True, False])
def test_update_follows_the_reinforce_gradient(tmp_path, baseline):
    # one step of plain SGD-equivalent: the policy gradient equals grad of -mean(log pi(a|s) * A)
    torch.manual_seed(0)
    policy = ActorCritic(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2))
    obs, actions = torch.randn(8, 3), torch.randint(0, 2, (8,))
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, -2.0, 1.0, 3.0])
    batch = {"obs": obs, "actions": actions, "advantages": advantages, "returns": advantages, "values": torch.zeros(8),
             "logp": torch.zeros(8), "valid": torch.tensor([1.0] * 7 + [0.0])}
    params = policy.params(obs)
    logp = policy.log_prob(params, actions)
    reference = -(logp * advantages)[:7].mean()  # the masked autoreset step (last) does not count
    expected = torch.autograd.grad(reference, list(policy.actor.parameters()))
    cfg = cfg_for(tmp_path, baseline=baseline, norm_adv=False, max_grad_norm=0.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    before = [p.detach().clone() for p in policy.actor.parameters()]
    pg.update(cfg, policy, optimizer, batch)
    for p, b, g in zip(policy.actor.parameters(), before, expected):
        torch.testing.assert_close(b - p.detach(), g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw, option", [(dict(vf_coef=-1.0), "vf_coef"), (dict(ent_coef=-0.5), "ent_coef"),
                                        (dict(learning_rate=0.0), "learning_rate"), (dict(num_envs=0), "num_envs")])
def test_bad_config_names_the_option(tmp_path, kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg_for(tmp_path, **kw)


def test_resume_continues_exactly(tmp_path):
    common = dict(num_envs=2, num_steps=64, seed=7, eval_episodes=2)
    check_resume_is_exact(pg, lambda **kw: cfg_for(tmp_path, **common, **kw), tmp_path, 128)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", [True])  # without a baseline only Psi_t changes; its gradient is tested above
def test_pg_learns_cartpole(tmp_path, baseline):
    cfg = parse_config(pg.Config, ["--config", str(CONFIGS / "pg_cartpole.yaml"), "--total_timesteps", "80000",
                                   "--baseline", str(baseline).lower(), "--output_dir", str(tmp_path / "run"),
                                   "--progress", "false", "--report_to", "none", "--seed", "1"])
    summary = pg.train(cfg)
    # seeds 1-4 end at 150-254 after 80k steps (at 50k: 82-175); a random policy scores ~22
    assert summary["eval/return_mean"] >= 100
