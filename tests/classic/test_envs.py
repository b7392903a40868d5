"""make_env / evaluate: Atari preprocessing, training-only tricks, repeatable batched evaluation, bad ids."""

import numpy as np
import pytest

from classic.envs import check_env_id, evaluate, is_atari, make_env
from rlhf.runtime import ConfigError


def test_unknown_env_id_names_the_option_and_suggests():
    with pytest.raises(ConfigError, match=r"`env_id`.*CartPol-v1.*CartPole-v1"):
        check_env_id("CartPol-v1")
    with pytest.raises(ConfigError, match="env_id"):
        make_env("NoSuchEnv-v0")


def test_atari_training_env_ends_episodes_on_lost_life_and_clips_rewards_eval_env_does_not():
    assert is_atari("BreakoutNoFrameskip-v4") and is_atari("ALE/Pong-v5") and not is_atari("CartPole-v1")
    train_env, eval_env = make_env("BreakoutNoFrameskip-v4", 0), make_env("BreakoutNoFrameskip-v4", 0, training=False)
    assert train_env.observation_space.shape == (4, 84, 84) and train_env.observation_space.dtype == np.uint8
    rng = np.random.default_rng(0)
    # training: the first lost life terminates an episode while the game still has lives left
    obs, _ = train_env.reset(seed=0)
    assert (obs == obs[:1]).all()  # a fresh stack repeats its first frame
    for _ in range(2000):
        obs, r, terminated, truncated, info = train_env.step(int(rng.integers(4)))
        assert r in (-1.0, 0.0, 1.0)
        if terminated:
            break
    assert terminated and info["lives"] > 0 and "episode" not in info
    # evaluation: a full game with all lives, recorded by RecordEpisodeStatistics
    eval_env.reset(seed=0)
    lives_seen = set()
    for _ in range(20000):
        _, r, terminated, truncated, info = eval_env.step(int(rng.integers(4)))
        lives_seen.add(info["lives"])
        if terminated or truncated:
            break
    assert terminated and 0 in lives_seen and len(lives_seen) == 6 and "episode" in info


def test_evaluate_is_repeatable_batched_and_records_trajectories():
    def act(obs):
        assert obs.ndim == 2  # one batch for all running envs
        return (obs[:, 2] > 0).astype(np.int64), obs[:, 0]  # lean-following policy, and some "value"

    traj = []
    m1, s1, r1 = evaluate(act, "CartPole-v1", 7, seed=3, num_envs=3, trajectories=traj)
    m2, _, r2 = evaluate(act, "CartPole-v1", 7, seed=3)
    assert len(r1) == 7 and sorted(r1) == sorted(r2)  # same seeds -> same episodes, however batched
    assert m1 == pytest.approx(np.mean(r1)) and s1 == pytest.approx(np.std(r1))
    assert len(traj) == 7 and sorted(t["rewards"].sum() for t in traj) == sorted(r1)
    assert all(len(t["values"]) == len(t["rewards"]) for t in traj)
    _, _, r3 = evaluate(act, "CartPole-v1", 7, seed=4)
    assert sorted(r3) != sorted(r1)


@pytest.mark.parametrize("config, env_id, sticky", [
    ("ppo_breakout.yaml", None, 0.0),  # the shipped config (CleanRL's BreakoutNoFrameskip-v4)
    ("ppo_breakout.yaml", "ALE/Breakout-v5", 0.25),
])
def test_on_policy_atari_trains_and_evaluates_on_the_env_ids_own_dynamics(monkeypatch, config, env_id, sticky):
    from pathlib import Path

    import ale_py.vector_env

    from classic import onpolicy, ppo
    from rlhf.runtime import parse_config

    built = []

    class Spy(ale_py.vector_env.AtariVectorEnv):  # the settings ale-py's vector env was really built with
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ale_py.vector_env, "AtariVectorEnv", Spy)
    path = Path(__file__).resolve().parents[2] / "configs" / "classic" / config
    cfg = parse_config(ppo.Config, ["--config", str(path)] + (["--env_id", env_id] if env_id else []))
    train_envs = onpolicy.make_env_from_cfg(cfg)
    eval_env = make_env(cfg.env_id, training=False)  # what `classic.envs.evaluate` plays
    try:
        eval_sticky = eval_env.unwrapped.ale.getFloat("repeat_action_probability")
        assert built[0]["repeat_action_probability"] == pytest.approx(eval_sticky) == pytest.approx(sticky)
        assert built[0]["full_action_space"] is False and train_envs.single_action_space == eval_env.action_space
    finally:
        train_envs.close()
        eval_env.close()


def test_ale_vector_env_ends_a_training_episode_on_a_lost_life_and_records_full_games():
    from classic.onpolicy import make_vector_env

    envs = make_vector_env("BreakoutNoFrameskip-v4", 2, seed=0)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    relaunch = np.zeros(2, dtype=bool)
    life_ends, games, last_lives = np.zeros(2, dtype=int), [], None
    for _ in range(600):
        _, rewards, terminated, truncated, info = envs.step(rng.integers(0, 4, size=2))
        assert (rewards[relaunch] == 0).all()  # the step after a lost life plays like an autoreset step
        if last_lives is not None:  # ... but the game goes on: no new lives
            assert (info["lives"][relaunch] == last_lives[relaunch]).all()
        relaunch = terminated & (info["lives"] > 0)
        life_ends += relaunch
        for i in np.flatnonzero(info.get("_episode", np.zeros(2, dtype=bool))):
            games.append((int(life_ends[i]), float(info["episode"]["r"][i])))  # a whole game: 4 lives lost before it
            life_ends[i] = 0
        last_lives = info["lives"].copy()
    envs.close()
    assert games and all(lost == 4 for lost, _ in games), games
