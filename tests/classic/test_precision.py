"""Mixed precision (`--bf16`) and channels-last CNNs: bf16 losses near fp32's on one batch, float32 master weights,
channels-last outputs equal to the contiguous net's, and bf16 runs that learn."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from classic import dqn, ppo
from classic.nets import QNetwork, bf16_copy, copy_weights
from classic.policies import ActorCritic
from rlhf.core import dqn_target, td_loss
from rlhf.runtime import make_config

ATARI_OBS = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
CARTPOLE_OBS = gym.spaces.Box(-5, 5, (4,), np.float32)

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operand); through the layers the losses below
# stay within 1.5% of fp32 (measured: at most ~0.5%) and the gradients point the same way (cosine > 0.99).
LOSS_RTOL, GRAD_COSINE = 0.015, 0.99


def _frames(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 frames (like game screens, unlike white noise) with a little noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 4, 1, 1, generator=g) * torch.linspace(0, 1, 84).view(1, 1, 84, 1) * 200
    return (base + torch.rand(n, 4, 84, 84, generator=g) * 40).to(torch.uint8)


def _grads(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _check_bf16_twin(fp32_net, bf16_net, loss_fn):
    """Same weights, one batch: losses within LOSS_RTOL, gradients aligned, every parameter and gradient float32."""
    losses = []
    for net in (fp32_net, bf16_net):
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net)
        assert loss.dtype == torch.float32
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= LOSS_RTOL * abs(losses[0]), losses
    cosine = torch.nn.functional.cosine_similarity(_grads(fp32_net), _grads(bf16_net), dim=0)
    assert cosine > GRAD_COSINE, cosine
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16_net.parameters())


@pytest.mark.parametrize("obs_shape, dueling", [((4, 84, 84), "none"), ((4, 84, 84), "max"), ((4,), "mean")])
def test_bf16_td_loss_is_within_tolerance_of_fp32(obs_shape, dueling):
    torch.manual_seed(0)
    fp32 = QNetwork(obs_shape, 4, [64, 64], dueling)
    bf16 = copy.deepcopy(fp32)
    bf16.bf16 = True
    target_net = copy.deepcopy(fp32)
    with torch.no_grad():  # a target net a little away from the online one, so the TD errors are not ~0
        for p in target_net.parameters():
            p.mul_(1.1)
    b = 32
    if len(obs_shape) == 3:
        obs, next_obs = _frames(b, 1), _frames(b, 2)
    else:
        obs, next_obs = torch.randn(b, 4), torch.randn(b, 4)
    actions, rewards = torch.randint(0, 4, (b,)), 0.01 * torch.randn(b)  # rewards of the Q-values' size
    terminated = (torch.rand(b) < 0.1).float()

    def loss_fn(net):
        with torch.no_grad():
            target_net.bf16 = net.bf16  # the target pass runs in the run's precision too
            target = dqn_target(rewards, target_net(next_obs), terminated, 0.99)
        q = net(obs)
        assert q.dtype == torch.float32
        return td_loss(q.gather(1, actions[:, None]).squeeze(1), target, kind="huber")[0]

    _check_bf16_twin(fp32, bf16, loss_fn)
    q32, q16 = fp32(obs), bf16(obs)
    assert (q16 - q32).abs().max() <= LOSS_RTOL * q32.abs().max()


@pytest.mark.parametrize("obs_space, act_space, policy", [
    (CARTPOLE_OBS, gym.spaces.Discrete(2), "mlp"),
    (gym.spaces.Box(-5, 5, (11,), np.float32), gym.spaces.Box(-1, 1, (3,)), "mlp"),
    (ATARI_OBS, gym.spaces.Discrete(4), "cnn"),
])
def test_bf16_ppo_loss_is_within_tolerance_of_fp32(tmp_path, obs_space, act_space, policy):
    torch.manual_seed(0)
    fp32 = ActorCritic(obs_space, act_space, policy)
    bf16 = copy.deepcopy(fp32)
    bf16.bf16 = True
    b = 64
    obs = _frames(b) if policy == "cnn" else torch.randn(b, obs_space.shape[0])
    actions, logp, values = (x.clone() for x in fp32.act(obs))  # act runs in inference mode
    with torch.no_grad():
        old_params = fp32.params(obs)
    g = torch.Generator().manual_seed(1)
    mb = {"obs": obs, "actions": actions, "logp": logp - 0.1 * torch.rand(b, generator=g), "values": values,
          "advantages": torch.randn(b, generator=g), "returns": values + torch.randn(b, generator=g),
          "valid": torch.ones(b), "old_params": old_params}
    cfg = make_config(ppo.Config, dict(output_dir=str(tmp_path), penalty="adaptive_kl", ent_coef=0.01))
    beta = torch.tensor(0.5)

    def loss_fn(net):
        loss, metrics = ppo.minibatch_loss(cfg, net, mb, beta)
        assert all(v.dtype == torch.float32 for v in metrics.values())
        return loss

    _check_bf16_twin(fp32, bf16, loss_fn)
    for net in (fp32, bf16):  # what the rollout stores: float32 log-probs and values, bf16 or not
        _, logp, values = net.act(obs)
        assert logp.dtype == values.dtype == torch.float32


@pytest.mark.parametrize("obs_shape", [(4, 84, 84), (4,)])
def test_the_bf16_copy_gives_autocasts_bits_and_follows_the_weights(obs_shape):
    torch.manual_seed(0)
    net = QNetwork(obs_shape, 4, [64, 64], "max", bf16=True, channels_last=True)
    twin = bf16_copy(net)
    obs = _frames(5) if len(obs_shape) == 3 else torch.randn(5, 4)
    assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert torch.equal(twin(obs), net(obs))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    assert not torch.equal(twin(obs), net(obs))
    copy_weights(twin, net)
    assert torch.equal(twin(obs), net(obs))


def test_channels_last_cnn_gives_the_contiguous_nets_outputs():
    torch.manual_seed(0)
    plain = QNetwork((4, 84, 84), 6, dueling="mean")
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert fast.torso.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    frames = _frames(8)
    torch.testing.assert_close(fast(frames), plain(frames), rtol=1e-4, atol=1e-5)
    policy = ActorCritic(ATARI_OBS, gym.spaces.Discrete(4), "cnn", channels_last=True)
    assert policy.torso.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(policy).to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(policy.params_and_value(frames), ref.params_and_value(frames), rtol=1e-4, atol=1e-5)


def test_the_run_records_its_precision(tmp_path, capsys):
    cfg = make_config(dqn.Config, dict(output_dir=str(tmp_path / "run"), total_timesteps=300, learning_starts=100,
                                       buffer_size=500, batch_size=16, hidden_sizes=[16], eval_frequency=0,
                                       eval_episodes=1, progress=False, report_to="none", bf16=True))
    summary = dqn.train(cfg)
    assert summary["precision"] == "bf16 autocast"
    assert "dqn CartPole-v1: bf16 autocast" in capsys.readouterr().err
    assert "bf16: true" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_bf16_dqn_learns_cartpole(tmp_path):
    torch.set_num_threads(1)
    cfg = make_config(dqn.Config, dict(
        output_dir=str(tmp_path / "run"), progress=False, report_to="none", seed=1, bf16=True,
        total_timesteps=10_000, learning_rate=2.3e-3, batch_size=64, buffer_size=10_000, learning_starts=500,
        target_update_interval=10, train_frequency=64, gradient_steps=32, exploration_fraction=0.3, end_e=0.04,
        hidden_sizes=[64, 64], eval_frequency=2500, eval_episodes=5, double_q=True, save_buffer=False))
    summary = dqn.train(cfg)
    # test_dqn's fp32 learning test (fp32, seeds 1-8: 154-500) in bf16: seeds 1-4 reached 500, 180, 195, 256;
    # a uniformly random policy averages ~22
    assert summary["eval/best_return_mean"] >= 100, summary
    assert summary["precision"] == "bf16 autocast"
