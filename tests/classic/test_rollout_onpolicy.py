"""The shared on-policy rollout: next-step autoreset, truncation bootstrap, GAE against hand numbers."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from classic.onpolicy import Rollout, env_state, load_env_state, make_vector_env


class Chain(gym.Env):
    """obs = [k + 1] at step k of an episode, reward 1 per step; terminates after `terminate_after` steps
    (if given), otherwise runs until the TimeLimit truncates it."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, terminate_after: int | None = None):
        self.terminate_after = terminate_after

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([1.0], np.float32), {}

    def step(self, action):
        self.k += 1
        terminated = self.terminate_after is not None and self.k >= self.terminate_after
        return np.array([self.k + 1.0], np.float32), 1.0, terminated, False, {}


def chain(terminate_after=None, max_steps=None):
    env = Chain(terminate_after)
    return gym.wrappers.TimeLimit(env, max_steps) if max_steps else env


class ObsIsValue(torch.nn.Module):
    """A stand-in policy whose value is its observation, V(s) = s[0], and action always 0."""

    def act(self, obs, deterministic=False):
        return torch.zeros(obs.shape[0], dtype=torch.long), torch.zeros(obs.shape[0]), obs[:, 0].clone()

    def value(self, obs):
        return obs[:, 0].clone()


def test_gae_with_truncation_and_termination_against_hand_numbers():
    # env 0 is truncated by a time limit after 2 steps, env 1 terminates after 2 steps.
    fns = [functools.partial(chain, max_steps=2), functools.partial(chain, terminate_after=2)]
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(fns))
    first_obs, _ = envs.reset(seed=0)
    rollout = Rollout(envs, ObsIsValue(), num_steps=5, device=torch.device("cpu"), first_obs=first_obs)
    finished = rollout.collect()
    adv, ret = rollout.advantages(gamma=0.5, lam=0.5)  # (T, N)

    # Hand-computed. Step by step the env sees obs 1, 2, [3 = final obs; autoreset step], 1, 2 and
    # the current obs after the rollout is the final obs 3 again. V(s) = s.
    # env 0 (truncated): deltas t0: 1 + .5*2 - 1 = 1; t1: 1 + .5*V(final=3) - 2 = 0.5 (bootstrapped);
    #   t3: 1; t4: 1 + .5*3 - 2 = 0.5. A1 = 0.5, A0 = 1 + .25*0.5 = 1.125, A4 = 0.5, A3 = 1.125.
    # env 1 (terminated): t1: 1 - 2 = -1 (no bootstrap); A1 = -1, A0 = 1 + .25*(-1) = 0.75; same at t3, t4.
    expected = torch.tensor([[1.125, 0.75], [0.5, -1.0], [0.0, 0.0], [1.125, 0.75], [0.5, -1.0]])
    valid = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(rollout.valid, valid)
    torch.testing.assert_close(adv * valid, expected)
    torch.testing.assert_close(ret * valid, (expected + rollout.values) * valid)
    # the autoreset step is no transition: reward 0, the stored observation is the final one
    torch.testing.assert_close(rollout.rewards[2], torch.zeros(2))
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(rollout.obs[:, :, 0], expected)
    torch.testing.assert_close(rollout.terminated[:, 1], torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(rollout.terminated[:, 0], torch.zeros(5))
    torch.testing.assert_close(rollout.episode_end[:, 0], torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]))
    assert sorted(finished) == [(2.0, 2)] * 4
    # the pending autoreset carries over to the next rollout: its first step is masked
    rollout.collect()
    torch.testing.assert_close(rollout.valid[0], torch.zeros(2))


def test_treating_truncation_as_termination_would_change_the_answer():
    # guards the test above: the bootstrap at a truncation really matters for the numbers checked
    fns = [functools.partial(chain, max_steps=2)]
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(fns))
    first_obs, _ = envs.reset(seed=0)
    rollout = Rollout(envs, ObsIsValue(), num_steps=2, device=torch.device("cpu"), first_obs=first_obs)
    rollout.collect()
    rollout.terminated.copy_(rollout.episode_end)
    adv, _ = rollout.advantages(gamma=0.5, lam=0.5)
    assert adv[1, 0].item() == pytest.approx(1.0 - 2.0)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MountainCar-v0", "Ant-v5"])
def test_vector_env_uses_next_step_autoreset_and_its_state_round_trips_as_json(env_id):
    # MountainCar's state turns from an array into a tuple; Ant reads body positions mj_step left behind
    envs = make_vector_env(env_id, 2, seed=0, norm_obs=True, norm_reward=True)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    envs.reset(seed=0)
    envs.action_space.seed(0)
    for _ in range(30):  # mid-episode
        envs.step(envs.action_space.sample())
    clone = make_vector_env(env_id, 2, seed=5, norm_obs=True, norm_reward=True)
    clone.reset(seed=5)
    load_env_state(clone, json.loads(json.dumps(env_state(envs))))
    for _ in range(50):
        a = envs.action_space.sample()
        o1, r1, *_ = envs.step(a)
        o2, r2, *_ = clone.step(a)
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(r1, r2)
    assert np.abs(o1).max() <= 10.0  # clipped normalised observations
