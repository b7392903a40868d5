"""Environments for `classic`: one `make_env` for training and evaluation, and a batched `evaluate`.

Atari follows Mnih et al. 2015 / Machado et al. 2018 with gymnasium's own wrappers:
`AtariPreprocessing` (up to 30 no-op starts, frame skip 4 with max-pooling of the last two
frames, 84x84 grey), FIRE on reset for games that need it, `FrameStackObservation(4)`. The emulator
plays the env id's own settings (`ale_dynamics`: ALE/*-v5 has sticky actions, *NoFrameskip-v4 none)
here and in ale-py's vector env that trains pg / ppo / trpo, so training and evaluation play one game.
Training envs add the two training-only tricks — a lost life ends the episode (the game goes
on) and rewards are clipped to their sign; evaluation envs play full games unclipped, so the
returns we report are game scores, comparable with CleanRL's and the papers'.

Resume note: environment state cannot be saved in general, so callers that want bit-exact
resumption reset with an explicit seed at checkpoint time; a seeded reset always starts a new
game, also under the life-loss wrapper (see `EpisodicLife.reset`).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from rlhf.runtime import ConfigError

try:  # Atari ROMs ship inside the ale-py wheel; registering makes the ALE/* and *NoFrameskip ids known
    import ale_py

    gym.register_envs(ale_py)
except ImportError:  # pragma: no cover - ale-py is a dependency, but classic control works without it
    ale_py = None


def check_env_id(env_id: str, option: str = "env_id") -> gym.envs.registration.EnvSpec:
    """Return the registered spec of `env_id`, or raise a ConfigError naming `option` (with a suggestion)."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see gymnasium.registry for the known ids)"
        raise ConfigError(f"`{option}`: unknown environment id {env_id!r}{hint}")
    return gym.spec(env_id)


def is_atari(env_id: str) -> bool:
    return "ale_py" in str(check_env_id(env_id).entry_point)


def env_spaces(env_id: str, atari: bool | None = None) -> tuple[gym.Space, gym.Space]:
    """(observation_space, action_space) of the env `make_env` builds, without stepping it."""
    env = make_env(env_id, atari=atari, training=False)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


class FireOnReset(gym.Wrapper):
    """Press FIRE after every reset, for games that stand still until FIRE (Breakout, ...).

    Under `EpisodicLife` this also relaunches the ball after a lost life, because that wrapper's
    reset continues the game.
    """

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:  # pathological: the game ended on FIRE; start again
            obs, info = self.env.reset(**kwargs)
        return obs, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the episode for the learner; the game itself goes on (training only).

    `reset()` after a lost life takes one no-op step instead of restarting the game. A reset with
    an explicit `seed` always starts a new game, so that seeded resets (used at checkpoints) put the
    env in a state that depends on the seed alone.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        self.game_over = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class EpisodicLifeVector(gym.vector.VectorWrapper):
    """`EpisodicLife` for ale-py's vector env (training only): a lost life ends the learner's episode,
    the game goes on. (ale-py's own `episodic_life=True` restarts the game instead, so later lives
    would never be played.)

    The step that loses a life reports `terminated`; that env's next step then looks like a
    next-step autoreset to the learner: its action is replaced by FIRE (NOOP in games without it)
    to relaunch play, as `EpisodicLife` + `FireOnReset` do on reset, and its reward is 0. Place it
    above `RecordEpisodeStatistics`, so that records full games.
    """

    def __init__(self, env):
        super().__init__(env)
        import ale_py

        action_set = list(env.unwrapped.ale.get_action_set())
        self.relaunch_action = action_set.index(ale_py.Action.FIRE) if ale_py.Action.FIRE in action_set else 0
        self.lives = np.zeros(self.num_envs, dtype=np.int64)
        self.relaunch = np.zeros(self.num_envs, dtype=bool)  # envs whose next step follows a lost life

    def reset(self, *, seed=None, options=None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.lives = np.asarray(infos["lives"]).copy()
        self.relaunch[:] = False
        return obs, infos

    def step(self, actions):
        actions = np.array(actions, copy=True)
        actions[self.relaunch] = self.relaunch_action
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        rewards = np.where(self.relaunch, 0, rewards).astype(rewards.dtype)
        lives = np.asarray(infos["lives"])
        lost = (lives < self.lives) & ~(terminated | truncated)  # a game over resets for real
        self.lives, self.relaunch = lives.copy(), lost
        return obs, rewards, terminated | lost, truncated, infos


def ale_dynamics(env_id: str) -> dict[str, Any]:
    """The emulator settings an Atari id registers (sticky actions, action set, frame cap).

    `make_env` gets them through `gym.make(env_id)`, and ale-py's vector env (training of pg / ppo /
    trpo) is built with the same ones, so training and evaluation play one game: ALE/*-v5 repeats
    the previous action with probability 0.25 at every frame (Machado et al. 2018), *NoFrameskip-v4
    never does. An id without them gets `AtariEnv`'s defaults (and the vector env's frame cap).
    """
    kwargs = check_env_id(env_id).kwargs
    return {
        "repeat_action_probability": float(kwargs.get("repeat_action_probability", 0.25)),
        "full_action_space": bool(kwargs.get("full_action_space", False)),
        "max_num_frames_per_episode": int(kwargs.get("max_num_frames_per_episode") or 108_000),
    }


def make_env(
    env_id: str,
    seed: int | None = None,
    *,
    atari: bool | None = None,
    training: bool = True,
    frame_stack: int = 4,
    noop_max: int = 30,
    frame_skip: int = 4,
    screen_size: int = 84,
    episodic_life: bool | None = None,
    clip_rewards: bool | None = None,
    max_episode_steps: int | None = None,
) -> gym.Env:
    """Build one env. `training=False` gives the evaluation variant (full games, raw rewards).

    Atari ids (auto-detected unless `atari` is given) get the standard preprocessing; the base env
    is made with frameskip=1 because `AtariPreprocessing` does the skipping (with max-pooling).
    Every env records episode statistics (`info["episode"]` with `r`, `l`): for Atari it sits
    below the life-loss and reward-clipping wrappers, so `r` is the full-game, unclipped score.
    `seed` seeds the action space only; pass `seed` to the first `reset` to seed the env itself.
    """
    spec = check_env_id(env_id)
    atari = is_atari(env_id) if atari is None else atari
    kwargs: dict[str, Any] = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if atari:
        if spec.kwargs.get("frameskip", 1) != 1:
            kwargs["frameskip"] = 1  # e.g. ALE/Breakout-v5: skipping happens in AtariPreprocessing
        env = gym.make(env_id, **kwargs)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=frame_skip, screen_size=screen_size,
                                              terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if training if episodic_life is None else episodic_life:
            env = EpisodicLife(env)
        if "FIRE" in env.unwrapped.get_action_meanings():
            env = FireOnReset(env)
        if training if clip_rewards is None else clip_rewards:
            env = gym.wrappers.TransformReward(env, lambda r: float(np.sign(r)))
        if frame_stack > 1:
            env = gym.wrappers.FrameStackObservation(env, frame_stack, padding_type="reset")
    else:
        env = gym.make(env_id, **kwargs)
        env = gym.wrappers.RecordEpisodeStatistics(env)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def evaluate(
    act_fn: Callable[[np.ndarray], Any],
    env_id: str,
    episodes: int,
    seed: int,
    *,
    num_envs: int | None = None,
    trajectories: list | None = None,
    **make_kwargs,
) -> tuple[float, float, np.ndarray]:
    """Play `episodes` full evaluation episodes; return (mean, std, returns).

    Episodes run side by side in `num_envs` envs (default: all of them) so the policy sees one batch
    per step. Env i is reset with seed `seed + i`, so an evaluation is repeatable; each env plays
    whole episodes only (finishing envs are not restarted early), so short episodes are not
    over-represented. `act_fn(obs_batch) -> actions`, or `(actions, values)` to also record a
    per-step value (e.g. predicted Q) into `trajectories`: when a list is given, one dict per
    episode is appended with `rewards`, `values` (if returned), `lives` (Atari) arrays and
    `truncated` (the episode was cut by a time limit).
    """
    num_envs = min(num_envs or episodes, episodes)
    envs = [make_env(env_id, seed + i, training=False, **make_kwargs) for i in range(num_envs)]
    next_seed = seed + num_envs
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    started, returns = num_envs, []
    active = list(range(num_envs))
    record = trajectories is not None
    traj = [{"rewards": [], "values": [], "lives": []} for _ in range(num_envs)]
    ret = np.zeros(num_envs)
    while active:
        out = act_fn(np.stack([obs[i] for i in active]))
        actions, values = out if isinstance(out, tuple) else (out, None)
        still = []
        for j, i in enumerate(active):
            o, r, terminated, truncated, info = envs[i].step(actions[j])
            ret[i] += r
            if record:
                traj[i]["rewards"].append(float(r))
                if values is not None:
                    traj[i]["values"].append(float(values[j]))
                if "lives" in info:
                    traj[i]["lives"].append(int(info["lives"]))
            if terminated or truncated:
                returns.append(float(ret[i]))
                if record:
                    trajectories.append({**{k: np.asarray(v) for k, v in traj[i].items()},
                                         "truncated": bool(truncated and not terminated)})
                    traj[i] = {"rewards": [], "values": [], "lives": []}
                ret[i] = 0.0
                if started < episodes:  # this env plays another whole episode
                    obs[i] = envs[i].reset(seed=next_seed)[0]
                    next_seed += 1
                    started += 1
                    still.append(i)
            else:
                obs[i] = o
                still.append(i)
        active = still
    for env in envs:
        env.close()
    returns_arr = np.asarray(returns, dtype=np.float64)
    return float(returns_arr.mean()), float(returns_arr.std()), returns_arr
