"""What vanilla PG, PPO and TRPO share: config fields, vector envs, the rollout, GAE, evaluation, the loop.

Each algorithm file (`pg.py`, `ppo.py`, `trpo.py`) reads top to bottom and calls into here for
the parts that are the same in all three, so they are written (and tested) once.

Autoreset. Gymnasium 1.x vector envs reset a finished sub-env on the *next* call to `step`
("next-step" mode, https://farama.org/Vector-Autoreset-Mode): the step that ends an episode
returns the episode's *final* observation as the ordinary next observation, and the following
step ignores the action, returns reward 0 and the reset observation. We keep that mode (the vector
`NormalizeObservation` wrapper refuses the "same-step" mode) and use it directly:
- the bootstrap value of a truncated step t is V(obs_{t+1}) = V(final observation), which the
  rollout computes anyway at step t+1, so truncation bootstraps without a special case;
- the reset step t+1 is not a transition of the MDP: it is stored with `valid = 0` and masked out
  of every loss, statistic and advantage normalisation (its own advantage is never used, and
  GAE does not reach across it because step t has `episode_end = 1`).
Truncation is not termination (Pardo et al. 2018; SB3 issue #633): `terminated` cuts the
bootstrap, `episode_end = terminated | truncated` only stops the GAE recursion.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import warnings
from collections import deque

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import vector as vw
from gymnasium.wrappers.utils import RunningMeanStd

from classic.envs import EpisodicLifeVector, ale_dynamics, check_env_id, env_spaces, is_atari
from classic.envs import evaluate as play_episodes
from classic.nets import keep_freed_memory, precision
from classic.policies import ActorCritic, is_image_space
from rlhf.core import discounted_returns, explained_variance, gae
from rlhf.runtime import (ConfigError, Run, Timer, arg, check, command_name, fmt_metrics, load_state,
                          loading_checkpoint, progress, resolve_checkpoint, save_state, seed_everything)


# --------------------------------------------------------------------------------------------
# Config fields shared by pg / ppo / trpo (a mixin: each command's Config is `(OnPolicyArgs, RunConfig)`)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OnPolicyArgs:
    env_id: str = arg("CartPole-v1", "Gymnasium environment id (classic control, MuJoCo e.g. Hopper-v5, "
                                     "or Atari e.g. ALE/Breakout-v5).")
    total_timesteps: int = arg(100_000, "Environment steps to train for (rounded up to whole rollouts).")
    num_envs: int = arg(4, "Parallel environments in the vector env.")
    num_steps: int = arg(128, "Steps per environment in each rollout (the horizon T); batch = num_envs * num_steps.")
    vector: str = arg("sync", "Vector env: sync (one process) or async (one process per env; resume is then not "
                              "bit-exact).", choices=("sync", "async"))
    gamma: float = arg(0.99, "Discount factor.")
    gae_lambda: float = arg(0.95, "GAE lambda (1: Monte-Carlo returns with a baseline, 0: one-step TD).")
    learning_rate: float = arg(3e-4, "Adam learning rate (of the value function for TRPO).")
    anneal_lr: bool = arg(True, "Linearly anneal the learning rate to 0 over training.")
    norm_adv: bool = arg(True, "Normalise advantages to zero mean, unit std (per minibatch).")
    max_grad_norm: float = arg(0.5, "Clip the global gradient norm to this (0: no clipping).")
    norm_obs: bool = arg(False, "Normalise observations with running statistics (gymnasium NormalizeObservation); "
                                "frozen at evaluation.")
    norm_reward: bool = arg(False, "Scale rewards by the std of a running discounted return (NormalizeReward).")
    clip_obs: float = arg(10.0, "Clip normalised observations to +-clip_obs (0: no clipping; with norm_obs).")
    clip_reward: float = arg(10.0, "Clip normalised rewards to +-clip_reward (0: no clipping; with norm_reward).")
    episodic_life: bool = arg(True, "Atari: a lost life ends the training episode, the game goes on (CleanRL's "
                                    "EpisodicLifeEnv); evaluation always plays full games.")
    policy: str = arg("auto", "Network: mlp, cnn (Nature CNN on 84x84 frames, discrete actions) or auto (cnn for "
                              "image observations).", choices=("auto", "mlp", "cnn"))
    hidden_sizes: list[int] = arg([64, 64], "Hidden layer sizes of the actor and critic MLPs (comma-separated).")
    activation: str = arg("tanh", "Hidden activation of the MLPs.", choices=("tanh", "relu"))
    init_log_std: float = arg(0.0, "Initial log-std of the Gaussian policy (continuous actions).")
    eval_episodes: int = arg(10, "Episodes of the final evaluation (deterministic policy; 0: none).")
    eval_interval: int = arg(0, "Also evaluate every this many environment steps (0: only at the end).")
    torch_threads: int = arg(1, "torch intra-op threads (1 is fastest for small MLPs; 0: leave torch's default).")
    device: str = arg("cpu", "torch device (cpu, cuda, cuda:0, ...).")

    def __post_init__(self):
        check(bool(self.env_id), "env_id", "must not be empty")
        check(self.total_timesteps >= 1, "total_timesteps", f"must be >= 1, got {self.total_timesteps}")
        check(self.num_envs >= 1, "num_envs", f"must be >= 1, got {self.num_envs}")
        check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.clip_obs >= 0, "clip_obs", f"must be >= 0, got {self.clip_obs}")
        check(self.clip_reward >= 0, "clip_reward", f"must be >= 0, got {self.clip_reward}")
        check(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "hidden_sizes",
              f"must be a non-empty list of positive sizes, got {self.hidden_sizes}")
        check(self.eval_episodes >= 0, "eval_episodes", f"must be >= 0, got {self.eval_episodes}")
        check(self.eval_interval >= 0, "eval_interval", f"must be >= 0, got {self.eval_interval}")
        check(self.torch_threads >= 0, "torch_threads", f"must be >= 0, got {self.torch_threads}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return math.ceil(self.total_timesteps / self.batch_size)


def atari_game(env_id: str) -> str:
    """`ALE/Breakout-v5` or `BreakoutNoFrameskip-v4` -> `breakout` (ale-py's snake_case ROM name)."""
    name = env_id.split("/")[-1].split("-")[0].replace("NoFrameskip", "")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def check_env(cfg: OnPolicyArgs) -> tuple[gym.Space, gym.Space, str]:
    """Validate the env against the config before any work; returns (obs space, action space, policy)."""
    check_env_id(cfg.env_id)  # a ConfigError naming `env_id` (with suggestions) if unknown
    obs_space, act_space = env_spaces(cfg.env_id)  # Atari: (4, 84, 84) uint8 frames, as ale-py's vector env gives
    discrete = isinstance(act_space, gym.spaces.Discrete)
    policy = cfg.policy
    if policy == "auto":
        policy = "cnn" if is_image_space(obs_space) else "mlp"
    if policy == "cnn":
        if not discrete:
            raise ConfigError(f"`policy`: cnn needs a discrete action space, but {cfg.env_id} has {act_space}")
        if not is_image_space(obs_space):
            raise ConfigError(f"`policy`: cnn needs image observations, but {cfg.env_id} has {obs_space}")
    if cfg.norm_obs and is_image_space(obs_space):
        raise ConfigError(f"`norm_obs`: image observations of {cfg.env_id} are scaled by 1/255 in the network; "
                          "set norm_obs false")
    return obs_space, act_space, policy


# --------------------------------------------------------------------------------------------
# Vector environments
# --------------------------------------------------------------------------------------------


def make_vector_env(
    env_id: str,
    num_envs: int,
    seed: int,
    vector: str = "sync",
    norm_obs: bool = False,
    norm_reward: bool = False,
    gamma: float = 0.99,
    clip_obs: float = 10.0,
    clip_reward: float = 10.0,
    episodic_life: bool = True,
) -> gym.vector.VectorEnv:
    """A gymnasium vector env (next-step autoreset; not reset yet: call `envs.reset(seed=...)`), episode statistics
    of *raw* rewards, then optional observation / reward normalisation. Atari ids use ale-py's own `AtariVectorEnv`
    (84x84 grey, 4-frame stack, frameskip 4, noop starts, fire reset; the env id's own sticky actions,
    as evaluation plays them; a lost life ends an episode with `episodic_life`; rewards clipped to
    [-1, 1] after the raw full-game return is recorded). Continuous actions are clipped to the action bounds by
    `Rollout.collect` (gymnasium's vector ClipAction holds a lambda and would not pickle); the
    policy's log-probs are of the unclipped sample, as in CleanRL / SB3.
    """
    if is_atari(env_id):
        import ale_py
        from ale_py.vector_env import AtariVectorEnv

        gym.register_envs(ale_py)
        envs = AtariVectorEnv(atari_game(env_id), num_envs, reward_clipping=False, num_threads=1,
                              **ale_dynamics(env_id))
        envs = vw.RecordEpisodeStatistics(envs)
        if episodic_life:
            envs = EpisodicLifeVector(envs)
        envs = vw.TransformReward(envs, functools.partial(_clip, bound=1.0))
        return envs
    fns = [functools.partial(gym.make, env_id) for _ in range(num_envs)]  # partial, not lambda: picklable
    envs = gym.vector.SyncVectorEnv(fns) if vector == "sync" else gym.vector.AsyncVectorEnv(fns)
    envs = vw.RecordEpisodeStatistics(envs)
    if norm_obs:
        envs = vw.NormalizeObservation(envs)
        if clip_obs:
            envs = vw.TransformObservation(envs, functools.partial(_clip, bound=clip_obs), envs.observation_space)
    if norm_reward:
        envs = vw.NormalizeReward(envs, gamma=gamma)
        if clip_reward:
            envs = vw.TransformReward(envs, functools.partial(_clip, bound=clip_reward))  # ClipReward holds a lambda
    return envs


def _clip(x: np.ndarray, bound: float) -> np.ndarray:
    return np.clip(x, -bound, bound)


def find_wrapper(envs, cls):
    while True:
        if isinstance(envs, cls):
            return envs
        if not hasattr(envs, "env"):
            return None
        envs = envs.env


def norm_stats(envs) -> dict:
    """Running statistics of the normalisation wrappers (numpy arrays), for checkpoints and evaluation."""
    out = {}
    obs_norm = find_wrapper(envs, vw.NormalizeObservation)
    if obs_norm is not None:
        rms = obs_norm.obs_rms
        out["obs"] = {"mean": rms.mean.copy(), "var": rms.var.copy(), "count": float(rms.count)}
    rew_norm = find_wrapper(envs, vw.NormalizeReward)
    if rew_norm is not None:
        rms = rew_norm.return_rms
        out["reward"] = {"mean": float(rms.mean), "var": float(rms.var), "count": float(rms.count),
                         "accumulated_reward": rew_norm.accumulated_reward.copy()}
    return out


def load_norm_stats(envs, stats: dict) -> None:
    obs_norm = find_wrapper(envs, vw.NormalizeObservation)
    if obs_norm is not None and "obs" in stats:
        rms = obs_norm.obs_rms
        s = stats["obs"]
        rms.mean, rms.var, rms.count = np.array(s["mean"]), np.array(s["var"]), s["count"]
    rew_norm = find_wrapper(envs, vw.NormalizeReward)
    if rew_norm is not None and "reward" in stats:
        s = stats["reward"]
        rew_norm.return_rms.mean, rew_norm.return_rms.var, rew_norm.return_rms.count = s["mean"], s["var"], s["count"]
        rew_norm.accumulated_reward[:] = s["accumulated_reward"]


def env_state(envs) -> dict | None:
    """What an exact resume needs of a sync vector env, as JSON-able data (a checkpoint must not be a pickle).

    For the vector env, each of its wrappers, each sub-env and each of their wrappers: every attribute
    that is plain state (numbers, numeric arrays, RNG states, running mean / std, queues of numbers),
    plus MuJoCo's full integration state (qpos, qvel, act, time, warm start, ...) from `mj_getState`
    and the derived quantities the envs read (`MUJOCO_DERIVED`). Spaces, functions, strings and
    renderers are configuration, rebuilt from the config. Tested exact on classic control and
    gymnasium's MuJoCo envs; state held in other C objects (Box2D bodies) is not plain data and is
    not saved. None for async vector envs (their sub-envs live in other processes) and ale-py's.
    """
    if not isinstance(envs.unwrapped, gym.vector.SyncVectorEnv):
        return None
    return {"vector": [_layer_state(x) for x in _layers(envs)],
            "envs": [[_layer_state(x) for x in _layers(e)] for e in envs.unwrapped.envs]}


def load_env_state(envs, data: dict) -> None:
    """Put `env_state`'s data into `envs`, made from the same config (and reset). Only attributes the
    fresh env has are set, and only with plain values (no object is built from the file); anything
    that does not fit (other wrappers, env or number of envs) is a ConfigError naming it."""
    sub_envs = envs.unwrapped.envs
    if len(data["envs"]) != len(sub_envs):
        raise ConfigError(f"envs.json holds {len(data['envs'])} environments, this run has {len(sub_envs)} "
                          "(`num_envs`)")
    for here, saved in [(_layers(envs), data["vector"])] + [(_layers(e), d) for e, d in zip(sub_envs, data["envs"])]:
        names, saved_names = [type(x).__name__ for x in here], [d["class"] for d in saved]
        if names != saved_names:
            raise ConfigError(f"envs.json was written for {' > '.join(saved_names)}, "
                              f"this run makes {' > '.join(names)} "
                              "(`env_id`, `norm_obs`, `norm_reward`, `clip_obs` or `clip_reward` differ)")
        for layer, d in zip(here, saved):
            _restore(layer, d["state"], f"envs.json: {d['class']}")


def _layers(env) -> list:
    """`env` and what it wraps, outermost first."""
    out = [env]
    while hasattr(out[-1], "env"):
        out.append(out[-1].env)
    return out


def _mujoco():
    import mujoco

    return mujoco, mujoco.mjtState.mjSTATE_INTEGRATION


# What gymnasium's MuJoCo envs read between steps besides the integration state. mj_step leaves them at
# the values of its first phase (before integrating), which mj_forward on the restored state would not
# give: Ant's and Humanoid's x_velocity start from xpos / xipos as the last step left them.
MUJOCO_DERIVED = ("xpos", "xipos", "site_xpos", "cinert", "cvel", "cfrc_ext", "qfrc_actuator", "qfrc_constraint",
                  "ten_length", "ten_velocity")


def _layer_state(obj) -> dict:
    state = {name: data for name, value in vars(obj).items() if (data := _to_data(value)) is not None}
    if hasattr(obj, "model") and hasattr(obj, "data"):  # MuJoCo: the physics lives in C structs
        mujoco, kind = _mujoco()
        physics = np.empty(mujoco.mj_stateSize(obj.model, kind), dtype=np.float64)
        mujoco.mj_getState(obj.model, obj.data, physics, kind)
        state["mujoco"] = _to_data([physics] + [getattr(obj.data, k) for k in MUJOCO_DERIVED])
    return {"class": type(obj).__name__, "state": state}


def _to_data(value):
    """`value` as tagged JSON data, or None where it is not plain state."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float, and keeps its type (NumPy 2 promotion)
        return {"scalar": value.item(), "dtype": value.dtype.str} if value.dtype.kind in "biuf" else None
    if value is None or isinstance(value, (bool, int, float)):
        return {"value": value}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":  # tolist() and JSON floats round-trip exactly
        return {"array": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.random.Generator):
        return {"rng": value.bit_generator.state}
    if isinstance(value, RunningMeanStd):
        return {"rms": {k: d for k, v in vars(value).items() if (d := _to_data(v)) is not None}}
    if isinstance(value, (list, tuple, deque)):
        items = [_to_data(v) for v in value]
        if not all(i is not None and ({"value", "scalar", "array"} & i.keys()) for i in items):
            return None
        return {"items": items, "type": type(value).__name__, "maxlen": getattr(value, "maxlen", None)}
    return None


def _restore(obj, state: dict, where: str) -> None:
    for name, data in state.items():
        if name == "mujoco" and hasattr(obj, "model"):
            mujoco, kind = _mujoco()
            physics, *derived = _from_data(data, [], f"{where}.mujoco")
            mujoco.mj_setState(obj.model, obj.data, physics, kind)
            mujoco.mj_forward(obj.model, obj.data)  # every derived quantity consistent with the state ...
            for key, value in zip(MUJOCO_DERIVED, derived, strict=True):  # ... then those the env reads, as they were
                getattr(obj.data, key)[...] = value
        elif name in vars(obj):
            setattr(obj, name, _from_data(data, getattr(obj, name), f"{where}.{name}"))
        else:
            raise ConfigError(f"{where} has no attribute `{name}` in this run")


def _from_data(data: dict, current, where: str):
    """The value `data` stands for; RNGs and running statistics are loaded into the fresh env's `current`.

    Plain values (numbers, arrays, None, sequences of numbers) replace plain values, as saved: their
    types, dtypes and shapes drift during a run (a running mean starts as a 0-d array, MountainCar's
    state turns from an array into a tuple), and `load_env_state`'s class checks already tie the
    checkpoint to this env.
    """
    if "rng" in data and isinstance(current, np.random.Generator):
        current.bit_generator.state = data["rng"]
        return current
    if "rms" in data and isinstance(current, RunningMeanStd):
        _restore(current, data["rms"], where)
        return current
    if ("rng" in data or "rms" in data or current is not None
            and not isinstance(current, (bool, int, float, np.generic, np.ndarray, list, tuple, deque))):
        raise ConfigError(f"{where}: saved as {next(iter(data))}, this run has {type(current).__name__}")
    if "items" in data:
        items = [_number_or_array(d, where) for d in data["items"]]
        kind = {"list": list, "tuple": tuple}.get(data["type"])
        return kind(items) if kind else deque(items, maxlen=data["maxlen"])
    return _number_or_array(data, where)


def _number_or_array(data: dict, where: str):
    """A number or numeric array from `_to_data`'s tags (a dtype that could hold objects is refused)."""
    if "value" in data and isinstance(data["value"], (type(None), bool, int, float)):
        return data["value"]
    if ("scalar" in data or "array" in data) and np.dtype(data["dtype"]).kind in "biuf":
        dtype = np.dtype(data["dtype"])
        if "scalar" in data:
            return dtype.type(data["scalar"])
        return np.array(data["array"], dtype=dtype).reshape(data["shape"])
    raise ConfigError(f"{where}: not a number or numeric array")


# --------------------------------------------------------------------------------------------
# Rollout storage and collection
# --------------------------------------------------------------------------------------------


class Rollout:
    """num_steps x num_envs transitions, collected with the current policy, plus GAE.

    Carries the env's current observation and the pending-autoreset flags from one rollout to the
    next (they are part of a checkpoint). Every buffer is allocated once.
    """

    def __init__(self, envs, policy: ActorCritic, num_steps: int, device: torch.device, first_obs: np.ndarray):
        n, t = envs.num_envs, num_steps
        obs_space, act_space = envs.single_observation_space, envs.single_action_space
        self.envs, self.policy, self.num_steps, self.device = envs, policy, num_steps, device
        # Buffers are numpy arrays written once per step (cheaper than small torch writes) and seen
        # by torch through zero-copy views (`self.obs`, ...), moved to `device` once per rollout.
        act_shape = () if isinstance(act_space, gym.spaces.Discrete) else act_space.shape
        obs_dtype = np.uint8 if is_image_space(obs_space) else np.float32
        self.obs = torch.from_numpy(np.zeros((t, n, *obs_space.shape), dtype=obs_dtype))  # (T, N, ...)
        self.actions = torch.from_numpy(np.zeros((t, n, *act_shape), dtype=np.int64 if not act_shape else np.float32))
        self.logp, self.values, self.rewards, self.terminated, self.episode_end, self.valid = (
            torch.from_numpy(np.zeros((t, n), dtype=np.float32)) for _ in range(6))  # (T, N); valid: 0 on autoresets
        self.action_bounds = (act_space.low, act_space.high) if isinstance(act_space, gym.spaces.Box) else None
        self.next_obs = first_obs  # numpy (N, ...): what the policy acts on next
        self.autoreset = np.zeros(n, dtype=bool)  # envs whose next step is a reset (their last step ended an episode)
        self.episode_returns: deque = deque(maxlen=100)  # raw returns of finished training episodes
        self.episode_lengths: deque = deque(maxlen=100)

    def _to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(obs)
        t = t if t.dtype == torch.uint8 else t.float()
        return t.to(self.device, non_blocking=True)

    def collect(self) -> list[tuple[float, int]]:
        """Run num_steps steps in every env; returns (return, length) of the episodes that finished."""
        finished = []
        obs_np, actions_np, logp_np, values_np, rewards_np, terminated_np, episode_end_np, valid_np = (
            x.numpy() for x in (self.obs, self.actions, self.logp, self.values, self.rewards, self.terminated,
                                self.episode_end, self.valid))
        numpy_act = getattr(self.policy, "numpy_act", lambda: None)()  # MLP on CPU: act in numpy (cheaper per step)
        for t in range(self.num_steps):
            obs_np[t] = self.next_obs
            if numpy_act is not None:
                actions, logp, values = numpy_act(self.next_obs)
            else:
                actions, logp, values = self.policy.act(self._to_tensor(self.next_obs))
                actions, logp, values = actions.cpu().numpy(), logp.cpu().numpy(), values.cpu().numpy()
            actions_np[t], logp_np[t], values_np[t] = actions, logp, values
            valid_np[t] = ~self.autoreset
            if self.action_bounds is not None:  # the Gaussian sample is stored unclipped; the env gets it clipped
                actions = np.clip(actions, *self.action_bounds)
            self.next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
            self.autoreset = np.logical_or(terminated, truncated)
            rewards_np[t], terminated_np[t], episode_end_np[t] = rewards, terminated, self.autoreset
            if "_episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    ret, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    finished.append((ret, length))
                    self.episode_returns.append(ret)
                    self.episode_lengths.append(length)
        return finished

    @torch.no_grad()
    def advantages(self, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE (rlhf.core.gae) with next_values[t] = V(obs_{t+1}); the last one from the current obs.

        Under next-step autoreset obs_{t+1} of an episode's last step is its final observation, so
        a truncated step bootstraps from V(final observation), as it must.
        """
        d = self.device
        values = self.values.to(d)
        last_value = self.policy.value(self._to_tensor(self.next_obs))  # (N,)
        next_values = torch.cat([values[1:], last_value.unsqueeze(0)])  # (T, N)
        return gae(self.rewards.to(d), values, next_values, self.terminated.to(d), self.episode_end.to(d), gamma, lam)

    def flat(self, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch as flat (T * N, ...) tensors for minibatching."""
        n, d = self.num_steps * self.envs.num_envs, self.device
        return {
            "obs": self.obs.reshape(n, *self.obs.shape[2:]).to(d),
            "actions": self.actions.reshape(n, *self.actions.shape[2:]).to(d),
            "logp": self.logp.reshape(n).to(d),
            "values": self.values.reshape(n).to(d),
            "advantages": advantages.reshape(n),
            "returns": returns.reshape(n),
            "valid": self.valid.reshape(n).to(d),
        }

    def state_dict(self) -> dict:
        return {"next_obs": torch.from_numpy(np.asarray(self.next_obs).copy()),
                "autoreset": torch.from_numpy(self.autoreset.copy()),
                "episode_returns": list(self.episode_returns), "episode_lengths": list(self.episode_lengths)}

    def load_state_dict(self, state: dict) -> None:
        self.next_obs = state["next_obs"].numpy()
        self.autoreset = state["autoreset"].numpy().astype(bool)
        self.episode_returns.extend(state["episode_returns"])
        self.episode_lengths.extend(state["episode_lengths"])


def crossed(step: int, prev_step: int, every: int) -> bool:
    """True when a multiple of `every` lies in (prev_step, step] (the rollout that reached it)."""
    return every > 0 and step // every != prev_step // every


def make_env_from_cfg(cfg: OnPolicyArgs):
    return make_vector_env(cfg.env_id, cfg.num_envs, cfg.seed, cfg.vector, cfg.norm_obs, cfg.norm_reward,
                           cfg.gamma, cfg.clip_obs, cfg.clip_reward, cfg.episodic_life)


# --------------------------------------------------------------------------------------------
# The training loop that pg / ppo / trpo share: setup and resume, each iteration's tail, the end of a run
# --------------------------------------------------------------------------------------------


class Loop:
    """The state of one pg / ppo / trpo run, from setup to the final evaluation.

    `Loop(cfg, name)` checks the env, seeds, builds the policy and the vector env; on resume the env
    is made anew and given the checkpoint's env state (exact: mid-episode states, RNGs and normalisation
    statistics). The algorithm then builds its optimisers and calls `open(...)`, which restores them
    from the checkpoint and only then opens the run directory, so a checkpoint that does not load
    changes nothing. Then `for batch in loop.rollouts(optimizer): <update>; loop.end_iteration(metrics)`,
    and `loop.finish()`.
    """

    def __init__(self, cfg: OnPolicyArgs, name: str, cnn_ok: bool = True):
        obs_space, act_space, policy_kind = check_env(cfg)
        if policy_kind == "cnn" and not cnn_ok:
            raise ConfigError(f"`policy`: {name.upper()} supports mlp policies only; {cfg.env_id} needs a CNN")
        self.cfg, self.name = cfg, name
        self.checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))
        keep_freed_memory()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = torch.device(cfg.device)
        seed_everything(cfg.seed, cfg.deterministic)
        self.policy = ActorCritic(obs_space, act_space, policy_kind, cfg.hidden_sizes, cfg.activation,
                                  cfg.init_log_std, cfg.bf16, cfg.channels_last).to(self.device)
        self.precision = precision(cfg, cnn=policy_kind == "cnn")
        envs = make_env_from_cfg(cfg)
        self.iteration, self.global_step, self.resumed = 0, 0, None
        if self.checkpoint is None:
            first_obs, _ = envs.reset(seed=cfg.seed)
            self.rollout = Rollout(envs, self.policy, cfg.num_steps, self.device, first_obs)
            return
        with loading_checkpoint(self.checkpoint):
            self.resumed = load_state(self.checkpoint / "state.pt")  # restores python / numpy / torch RNGs
            self.policy.load_state_dict(self.resumed["policy"])
            first_obs, _ = envs.reset(seed=cfg.seed + int(self.resumed["global_step"]))
            self.rollout = Rollout(envs, self.policy, cfg.num_steps, self.device, first_obs)
            # a sync vector env's state (resolve_checkpoint refused a checkpoint that lost it)
            if (self.checkpoint / "envs.json").exists():
                load_env_state(envs, json.loads((self.checkpoint / "envs.json").read_text()))
                self.rollout.load_state_dict(self.resumed["rollout"])
            else:
                warnings.warn(f"resuming {cfg.env_id} with vector={cfg.vector}: the environments restart from fresh "
                              "episodes (async and ale-py vector envs keep their state outside this process, so it is "
                              "not checkpointed); the run is not bit-exact")
                load_norm_stats(envs, self.resumed["norm_stats"])

    def open(self, **state) -> dict:
        """Restore the algorithm's `state` from the checkpoint, then open the run directory and start the clock.

        Objects with `load_state_dict` (optimisers, controllers; None is skipped) load in place and are
        saved with every checkpoint; plain values come back in the returned dict, from the checkpoint
        or, on a fresh start, as given (the algorithm passes their current values to `end_iteration`).
        """
        self.stateful = {k: v for k, v in state.items() if hasattr(v, "load_state_dict")}
        plain = {k: v for k, v in state.items() if v is not None and k not in self.stateful}
        if self.resumed is not None:
            with loading_checkpoint(self.checkpoint):
                for key, obj in self.stateful.items():
                    obj.load_state_dict(self.resumed[key])
                plain = {k: self.resumed[k] for k in plain}
            self.iteration, self.global_step = self.resumed["iteration"], int(self.resumed["global_step"])
        self.run = Run(self.cfg, checkpoint=self.checkpoint)
        print(f"{self.name} {self.cfg.env_id}: {self.precision}", file=sys.stderr)
        self.timer, self.start_step = Timer(), self.global_step
        self.bar = progress(self.cfg.num_iterations * self.cfg.batch_size, f"{self.name} {self.cfg.env_id}",
                            self.cfg.progress, initial=self.global_step)
        return plain

    def rollouts(self, optimizer: torch.optim.Optimizer, gae: bool = True):
        """For each iteration left: anneal `optimizer`'s learning rate (`anneal_lr`), collect one rollout with
        the current policy and yield it as a flat batch (`Rollout.flat`) with GAE advantages and returns,
        or with `gae=False` the discounted Monte-Carlo returns as advantages."""
        cfg = self.cfg
        for self.iteration in range(self.iteration + 1, cfg.num_iterations + 1):
            if cfg.anneal_lr:
                optimizer.param_groups[0]["lr"] = cfg.learning_rate * (1.0 - (self.iteration - 1) / cfg.num_iterations)
            self.finished = self.rollout.collect()
            self.prev_step, self.global_step = self.global_step, self.global_step + cfg.batch_size
            if gae:
                advantages, returns = self.rollout.advantages(cfg.gamma, cfg.gae_lambda)  # (T, N)
            else:
                returns = advantages = discounted_returns(self.rollout.rewards, self.rollout.episode_end, cfg.gamma)
            self.batch = self.rollout.flat(advantages, returns)
            yield self.batch

    def end_iteration(self, metrics: dict, value_trained: bool = True, **plain) -> None:
        """The tail of every iteration: adds the rollout's metrics (explained variance unless `value_trained`
        is false, episode returns) and `time/sps`; evaluates, logs and checkpoints when their intervals are
        crossed, and always checkpoints the last iteration, so every run can be resumed or extended.
        `plain`: the current values of the plain state given to `open`.
        """
        cfg, step, batch = self.cfg, self.global_step, self.batch
        metrics = {k: float(v) for k, v in metrics.items()}
        if value_trained:
            explained = explained_variance(batch["values"], batch["returns"], batch["valid"])
            metrics["value/explained_var"] = float(explained)
        if self.finished:
            metrics["train/episode_return"] = float(np.mean([r for r, _ in self.finished]))
            metrics["train/episode_length"] = float(np.mean([n for _, n in self.finished]))
        if self.rollout.episode_returns:
            metrics["train/episode_return_last100"] = float(np.mean(self.rollout.episode_returns))
        metrics["time/sps"] = (step - self.start_step) / max(self.timer.elapsed(), 1e-9)
        if crossed(step, self.prev_step, cfg.eval_interval):
            metrics.update(self.evaluate(cfg.eval_episodes or 10))
        if crossed(step, self.prev_step, cfg.logging_steps):
            self.run.log(step, metrics)
        self.bar.update(cfg.batch_size)
        self.bar.set_postfix(fmt_metrics(metrics, ["train/episode_return_last100", "eval/return_mean",
                                                   "policy/approx_kl", "time/sps"]))
        if not (crossed(step, self.prev_step, cfg.save_steps) or self.iteration == cfg.num_iterations):
            return
        # checkpoints/step-N/{state.pt, envs.json}: policy, optimisers, counters, RNGs, env and normalisation state
        with self.run.checkpoint(step) as d:
            data = env_state(self.rollout.envs)
            if data is not None:
                (d / "envs.json").write_text(json.dumps(data))  # NaN / inf as JSON's NaN / Infinity: exact either way
            save_state(d / "state.pt", {"policy": self.policy.state_dict(), "iteration": self.iteration,
                                        **{k: v.state_dict() for k, v in self.stateful.items()}, **plain,
                                        "global_step": step, "rollout": self.rollout.state_dict(),
                                        "norm_stats": norm_stats(self.rollout.envs)})

    @torch.no_grad()
    def evaluate(self, episodes: int) -> dict:
        """Mean / std of the raw return of `episodes` whole episodes of the deterministic policy (mode of pi).

        Episodes are played by `classic.envs.evaluate` (full games, raw rewards); observations are
        normalised with the training statistics, frozen, exactly as `NormalizeObservation` does.
        """
        cfg, policy, stats = self.cfg, self.policy, norm_stats(self.rollout.envs)

        def act(obs: np.ndarray) -> np.ndarray:
            if "obs" in stats:
                obs = (obs - stats["obs"]["mean"]) / np.sqrt(stats["obs"]["var"] + 1e-8)  # NormalizeObservation's eps
                if cfg.clip_obs:
                    obs = np.clip(obs, -cfg.clip_obs, cfg.clip_obs)
            t = torch.from_numpy(np.asarray(obs))
            t = (t if t.dtype == torch.uint8 else t.float()).to(self.device)
            actions = policy.act(t, deterministic=True)[0].cpu().numpy()
            # as ClipAction does in training (MuJoCo's control cost sees the unclipped action)
            return actions if policy.discrete else np.clip(actions, policy.action_low, policy.action_high)

        policy.eval()
        mean, std, _ = play_episodes(act, cfg.env_id, episodes, cfg.seed + 100_000)
        policy.train()
        return {"eval/return_mean": mean, "eval/return_std": std}

    def finish(self) -> dict:
        """Final evaluation (frozen normalisation statistics), summary.json, close everything.

        `time/sps` per wall second, `time/cpu_sps` per CPU second of this process, of the training loop
        of this process only (from `open`), like DQN's."""
        self.bar.close()
        cfg, steps = self.cfg, self.global_step - self.start_step
        summary = {"global_step": self.global_step, "time/sps": steps / max(self.timer.elapsed(), 1e-9),
                   "time/cpu_sps": steps / max(self.timer.cpu_elapsed(), 1e-9), "precision": self.precision}
        if self.rollout.episode_returns:
            summary["train/episode_return_last100"] = float(np.mean(self.rollout.episode_returns))
        if cfg.eval_episodes:
            summary.update(self.evaluate(cfg.eval_episodes))
            self.run.log(self.global_step, {k: v for k, v in summary.items() if k.startswith("eval/")})
        self.run.write_summary(summary)
        self.run.close()
        self.rollout.envs.close()
        return summary
