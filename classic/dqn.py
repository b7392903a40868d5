"""DQN and its family on gymnasium: Double DQN, Dueling (mean / max), prioritised replay, n-step.

    classic dqn --env_id CartPole-v1 --total_timesteps 100000 --seed 1 --output_dir runs/dqn
    classic dqn --config configs/classic/dqn_breakout.yaml

References: Mnih et al. 2015 (DQN, Nature: replay, target network, Huber "error clipping");
van Hasselt et al. 2016 (Double DQN); Wang et al. 2016 (Dueling, eqs. 8-9); Schaul et al. 2016
(prioritised replay, Alg. 1); Sutton 1988 / Hessel et al. 2018 (n-step targets). The math
(targets, dueling aggregation, weighted TD loss) is `rlhf.core`; this file is the loop.

Over-estimation diagnostics: every log line carries `q/replay_max` (mean max_a Q(s, a) on replayed
states) next to `q/replay_return` (the discounted return actually obtained from those states by
the behaviour policy), and every evaluation `eval/q_taken` next to `eval/mc_return` (Q of the
evaluation policy's actions vs. the discounted return that followed them). Atari evaluation
reports full-game, unclipped scores, while its Q diagnostics use clipped rewards cut at a lost
life, as the Q-function was trained.

Resume: checkpoints are written at the first episode end after every `save_steps` steps, and the
next episode starts from a reset seeded by the step count (in the straight run as in a resumed
one). With the replay memory saved (`save_buffer`), a run resumed from a checkpoint continues
bit-for-bit as if it had not stopped (tested); without it, training restarts from an empty memory.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import torch

from classic.buffers import PrioritizedReplayBuffer, ReplayBuffer
from classic.envs import check_env_id, env_spaces, evaluate, is_atari, make_env
from classic.nets import (FUSED_ADAM, PrecisionArgs, QNetwork, adam_step, bf16_copy, clip_grad_norm, copy_weights,
                          keep_freed_memory, precision)
from rlhf.core import discounted_returns, dqn_target, td_loss
from rlhf.runtime import (Run, RunConfig, Timer, arg, check, command_name, fmt_metrics, load_state, loading_checkpoint,
                          progress, resolve_checkpoint, save_state, seed_everything)


@dataclasses.dataclass
class Config(PrecisionArgs, RunConfig):
    """DQN family: DQN, Double DQN, Dueling (mean|max), prioritised replay, n-step returns.

    Defaults are rl-baselines3-zoo's CartPole settings (configs/classic/dqn_cartpole.yaml averages the target net
    after every gradient step, bootstraps after 3 steps, decays the learning rate and halves the gradient steps, for a
    steadier end of the run);
    Atari wants configs/classic/dqn_breakout.yaml-like settings.
    """

    output_dir: str = arg("runs/dqn", "Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/.")
    logging_steps: int = arg(1000, "Log training metrics every this many environment steps.")
    env_id: str = arg("CartPole-v1", "Gymnasium id with a discrete action space (Atari ids: Atari preprocessing).")
    total_timesteps: int = arg(100_000, "Environment steps to train for.")
    learning_rate: float = arg(2.3e-3, "Adam learning rate (the initial one when end_learning_rate is set).")
    end_learning_rate: float | None = arg(None, "Decay the learning rate linearly to this over lr_decay_fraction of "
                                                "total_timesteps, then hold it (none: constant learning_rate).")
    lr_decay_fraction: float = arg(1.0, "Fraction of total_timesteps over which the learning rate decays to "
                                        "end_learning_rate.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    buffer_size: int = arg(100_000, "Replay memory size in transitions (Atari stores each 84x84 frame once).")
    batch_size: int = arg(64, "Transitions per gradient step.")
    gamma: float = arg(0.99, "Discount factor.")
    tau: float = arg(1.0, "Target network update rate: 1.0 copies the online net (hard update), < 1: Polyak averaging.")
    target_update_interval: int = arg(10, "Update the target network every this many env steps (C in the DQN paper), "
                                          "or gradient steps (target_update_unit).")
    target_update_unit: str = arg("env_step", "What target_update_interval counts: env_step, or gradient_step (with "
                                              "interval 1 and tau < 1: Polyak averaging after every gradient step).",
                                  choices=("env_step", "gradient_step"))
    train_frequency: int = arg(256, "Do `gradient_steps` gradient steps every this many environment steps.")
    gradient_steps: int = arg(128, "Gradient steps per training round.")
    learning_starts: int = arg(1_000, "Environment steps of pure collection before learning starts.")
    start_e: float = arg(1.0, "Initial epsilon of the epsilon-greedy behaviour policy.")
    end_e: float = arg(0.04, "Final epsilon.")
    exploration_fraction: float = arg(0.08, "Fraction of total_timesteps over which epsilon decays linearly to end_e.")
    double_q: bool = arg(False, "Double DQN target: argmax from the online net, value from the target net.")
    dueling: str = arg("none", "Dueling head: none, or V + A - mean(A) / V + A - max(A).",
                       choices=("none", "mean", "max"))
    prioritized: bool = arg(False, "Prioritised replay (proportional, sum tree).")
    per_alpha: float = arg(0.6, "Priority exponent alpha (0 = uniform).")
    per_beta: float = arg(0.4, "Initial importance-sampling exponent beta, annealed linearly to 1 over training.")
    per_eps: float = arg(1e-6, "Added to |TD error| so no transition has zero priority.")
    n_step: int = arg(1, "n-step returns: bootstrap after n rewards (1 = standard DQN).")
    loss: str = arg("huber", "TD loss: huber (Nature DQN error clipping) or mse.", choices=("huber", "mse"))
    max_grad_norm: float = arg(10.0, "Clip the gradient norm to this (0 = no clipping).")
    hidden_sizes: list[int] = arg([256, 256], "Hidden layers of the MLP Q-network (ignored for image observations).")
    eval_frequency: int = arg(5_000, "Evaluate every this many environment steps (0 = only at the end).")
    eval_episodes: int = arg(10, "Episodes per evaluation (full games for Atari).")
    eval_epsilon: float = arg(0.0, "Epsilon of the evaluation policy (0.05 is usual for Atari).")
    stop_at_return: float | None = arg(None, "Stop early once an evaluation's mean return reaches this (none: never).")
    save_buffer: bool = arg(True, "Save the replay memory in checkpoints (for an exact resume; ~7 GB for 1M Atari).")
    torch_threads: int = arg(0, "torch threads (0 = 1 for vector observations, all cores for images).")
    device: str = arg("cpu", "torch device of the Q-networks and their gradient steps (cpu, cuda, cuda:0, ...); "
                             "the replay memory and the environment stay in host memory, each sampled batch is moved.")

    def __post_init__(self):
        check(self.total_timesteps >= 1, "total_timesteps", "must be >= 1")
        check(self.n_step >= 1, "n_step", f"must be >= 1, got {self.n_step}")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.buffer_size >= self.batch_size, "buffer_size",
              f"{self.buffer_size} is smaller than batch_size {self.batch_size}")
        check(self.buffer_size >= self.n_step + 5, "buffer_size",
              f"must hold at least n_step + 5 = {self.n_step + 5} transitions")
        check(0.0 < self.gamma <= 1.0, "gamma", "must be in (0, 1]")
        check(0.0 < self.tau <= 1.0, "tau", "must be in (0, 1]")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.end_learning_rate is None or 0 <= self.end_learning_rate <= self.learning_rate, "end_learning_rate",
              f"must be in [0, learning_rate = {self.learning_rate}], got {self.end_learning_rate}")
        check(0.0 < self.lr_decay_fraction <= 1.0, "lr_decay_fraction", "must be in (0, 1]")
        check(self.target_update_interval >= 1, "target_update_interval", "must be >= 1")
        check(self.train_frequency >= 1, "train_frequency", "must be >= 1")
        check(self.gradient_steps >= 1, "gradient_steps", "must be >= 1")
        check(self.learning_starts >= 0, "learning_starts", "must be >= 0")
        check(0.0 <= self.end_e <= self.start_e <= 1.0, "end_e", "need 0 <= end_e <= start_e <= 1")
        check(0.0 < self.exploration_fraction <= 1.0, "exploration_fraction", "must be in (0, 1]")
        check(self.per_alpha >= 0, "per_alpha", "must be >= 0")
        check(0.0 <= self.per_beta <= 1.0, "per_beta", "must be in [0, 1]")
        check(self.per_eps > 0, "per_eps", "must be > 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(len(self.hidden_sizes) >= 1 and all(h > 0 for h in self.hidden_sizes), "hidden_sizes",
              "needs at least one positive layer size")
        check(self.eval_frequency >= 0, "eval_frequency", "must be >= 0")
        check(self.eval_episodes >= 1, "eval_episodes", "must be >= 1")
        check(0.0 <= self.eval_epsilon <= 1.0, "eval_epsilon", "must be in [0, 1]")
        check(self.save_steps >= 0, "save_steps", "must be >= 0")
        check(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        check_env_id(self.env_id, "env_id")
        _, action_space = env_spaces(self.env_id)
        check(hasattr(action_space, "n"), "env_id",
              f"{self.env_id} has a {type(action_space).__name__} action space; DQN needs a discrete one")


def linear_schedule(start: float, end: float, duration: float, t: int) -> float:
    return start + (end - start) * min(1.0, t / max(duration, 1.0))


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate at `step`: constant, or decaying linearly to end_learning_rate (late updates then move the
    converged Q-function less, so the policy at the end of a run is the one it learnt, not a swing away from it)."""
    if cfg.end_learning_rate is None:
        return cfg.learning_rate
    return linear_schedule(cfg.learning_rate, cfg.end_learning_rate, cfg.lr_decay_fraction * cfg.total_timesteps, step)


def reset_seed(cfg: Config, step: int) -> int:
    """Seed of the reset at `step` (start of training, and after each checkpoint): a function of the step only."""
    return (cfg.seed * 1_000_003 + step) % 2**31


def q_vs_return(trajectories: list[dict], gamma: float, atari: bool) -> tuple[float, float]:
    """Mean predicted Q(s, a) of the evaluation policy vs. the discounted return that followed.

    Atari: rewards clipped to their sign and the return cut at each lost life (what Q was trained
    on). Steps too close to a time-limit cut (gamma^h > 1%) are left out: their return misses the tail.
    """
    horizon = np.inf if gamma >= 1 else np.log(0.01) / np.log(gamma)
    preds, rets = [], []
    for tr in trajectories:
        rewards = np.sign(tr["rewards"]) if atari else tr["rewards"]
        ends = np.zeros(len(rewards))
        ends[-1] = 1.0
        if atari and len(tr["lives"]) == len(rewards):
            ends[:-1] = np.diff(tr["lives"]) < 0
        g = discounted_returns(torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(ends), gamma).numpy()
        keep = np.arange(len(g)) < len(g) - horizon if len(g) and tr.get("truncated") else np.ones(len(g), bool)
        preds.append(tr["values"][keep])
        rets.append(g[keep])
    preds, rets = np.concatenate(preds), np.concatenate(rets)
    return (float(preds.mean()), float(rets.mean())) if len(preds) else (float("nan"), float("nan"))


class QNets:
    """The online Q-network, its target copy, the optimiser, and the passes without gradient (acting, targets).

    fp32: acting and targets run on numpy passes where they apply (`numpy_mlp`; None for CNN / dueling nets),
    which read views of the parameters, so they follow optimiser steps, `load_state_dict` and the target's
    in-place `lerp_`. bf16: they run on bfloat16 copies of the two nets (`bf16_copy`; the same bits as
    autocast), which `weights_changed` refreshes after every training round, target update and load.
    """

    def __init__(self, cfg: Config, obs_shape, n_actions: int):
        kwargs = dict(dueling=cfg.dueling, bf16=cfg.bf16, channels_last=cfg.channels_last)
        self.device = torch.device(cfg.device)
        self.online = QNetwork(obs_shape, n_actions, cfg.hidden_sizes, **kwargs).to(self.device)
        self.target = QNetwork(obs_shape, n_actions, cfg.hidden_sizes, **kwargs).to(self.device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.params = list(self.online.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.learning_rate, eps=cfg.adam_eps, fused=FUSED_ADAM)
        self.bf16 = cfg.bf16
        self.acting = bf16_copy(self.online) if cfg.bf16 else self.online
        self.target_pass = bf16_copy(self.target) if cfg.bf16 else self.target
        numpy_passes = not cfg.bf16 and self.device.type == "cpu"  # numpy reads the parameters in host memory
        self.online_numpy = self.online.numpy_forward() if numpy_passes else None
        self.target_numpy = self.target.numpy_forward() if numpy_passes else None

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A host array (observations, a replayed batch) as a tensor on the nets' device (no copy on CPU)."""
        return torch.from_numpy(np.asarray(array)).to(self.device, non_blocking=True)

    def weights_changed(self, online: bool = True, target: bool = False) -> None:
        """Refresh the bf16 copies of the nets whose weights changed (nothing to do in fp32)."""
        if self.bf16 and online:
            copy_weights(self.acting, self.online)
        if self.bf16 and target:
            copy_weights(self.target_pass, self.target)


def update_target(cfg: Config, nets: QNets) -> None:
    """target <- (1 - tau) target + tau online (tau = 1: a copy)."""
    with torch.no_grad():
        for p_target, p in zip(nets.target.parameters(), nets.online.parameters()):
            p_target.lerp_(p, cfg.tau)
    nets.weights_changed(online=False, target=True)


def make_replay(cfg: Config, env) -> ReplayBuffer:
    obs_shape, atari = env.observation_space.shape, is_atari(cfg.env_id)
    frame_shape = obs_shape[1:] if atari else obs_shape  # Atari: store single frames, rebuild the stack
    kwargs = dict(capacity=cfg.buffer_size, frame_shape=frame_shape, frame_dtype=env.observation_space.dtype,
                  frame_stack=obs_shape[0] if atari else 1, n_step=cfg.n_step, gamma=cfg.gamma, seed=cfg.seed)
    if cfg.prioritized:
        return PrioritizedReplayBuffer(**kwargs, alpha=cfg.per_alpha, eps=cfg.per_eps)
    return ReplayBuffer(**kwargs)


def act(nets: QNets, rng: np.random.Generator, obs, epsilon: float, n_actions: int) -> int:
    """The epsilon-greedy behaviour policy."""
    if rng.random() < epsilon:
        return int(rng.integers(n_actions))
    if nets.online_numpy is not None:
        return int(nets.online_numpy(np.asarray(obs)[None]).argmax())
    with torch.inference_mode():
        return int(nets.acting(nets.tensor(obs)[None]).argmax())


def learn(cfg: Config, nets: QNets, replay: ReplayBuffer, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient step on a replayed batch (TD loss on the (Double) DQN target); returns (loss, mean Q taken)."""
    batch = replay.sample(cfg.batch_size, beta=beta)
    obs, next_obs = nets.tensor(batch.obs), nets.tensor(batch.next_obs)
    actions = nets.tensor(batch.actions)  # (B,)
    if nets.target_numpy is not None:  # needs no gradient, so numpy (cheaper per layer, see numpy_mlp)
        next_q_target = torch.from_numpy(nets.target_numpy(batch.next_obs))  # (B, A)
    else:
        with torch.no_grad():
            next_q_target = nets.target_pass(next_obs)  # (B, A)
    if cfg.double_q:  # one forward pass for Q(s) and Q(s') of the online net
        q_all = nets.online(torch.cat([obs, next_obs]))  # (2B, A)
        q_obs, next_q_online = q_all[: cfg.batch_size], q_all[cfg.batch_size:].detach()
    else:
        q_obs, next_q_online = nets.online(obs), None
    target = dqn_target(nets.tensor(batch.rewards), next_q_target, nets.tensor(batch.terminated),
                        nets.tensor(batch.discounts), next_q_online=next_q_online)  # (B,)
    q_taken = q_obs.gather(1, actions[:, None]).squeeze(1)  # (B,)
    weights = nets.tensor(batch.weights) if cfg.prioritized else None
    loss, td_errors = td_loss(q_taken, target, weights=weights, kind=cfg.loss)
    for p in nets.params:  # = optimizer.zero_grad(set_to_none=True), without its profiler-hook overhead
        p.grad = None
    loss.backward()
    if cfg.max_grad_norm > 0:
        clip_grad_norm(nets.params, cfg.max_grad_norm)
    adam_step(nets.optimizer)
    replay.update_priorities(batch.indices, td_errors.cpu().numpy())
    return loss.detach(), q_taken.detach().mean()


def new_window() -> dict:
    """Sums since the last log line: TD loss and mean Q per gradient step, and the episodes that ended."""
    return {"loss": 0.0, "q": 0.0, "n": 0, "returns": [], "lengths": []}


@dataclasses.dataclass
class Counters:
    """Where a run stands; saved with every checkpoint (plain data)."""

    step: int = 0
    n_updates: int = 0
    episodes: int = 0
    last_eval: dict = dataclasses.field(default_factory=dict)
    best_eval: float = -np.inf
    stopped_early: bool = False  # an evaluation reached stop_at_return
    since_log: dict = dataclasses.field(default_factory=new_window)


def evaluate_q(cfg: Config, q_net: QNetwork, at_step: int) -> dict:
    """Return of `eval_episodes` episodes of the (epsilon-)greedy policy, and its Q vs. the return that followed."""
    eval_rng = np.random.default_rng([cfg.seed, at_step])  # independent of the training RNGs
    device = next(q_net.parameters()).device

    def eval_act(obs_batch: np.ndarray):
        with torch.inference_mode():
            q = q_net(torch.as_tensor(obs_batch, device=device)).cpu()  # (E, A)
        actions = q.argmax(1).numpy()
        explore = eval_rng.random(len(actions)) < cfg.eval_epsilon
        actions[explore] = eval_rng.integers(q.shape[1], size=int(explore.sum()))
        return actions, q[np.arange(len(actions)), actions].numpy()

    trajectories: list[dict] = []
    mean, std, _ = evaluate(eval_act, cfg.env_id, cfg.eval_episodes, seed=reset_seed(cfg, at_step) + 7919,
                            trajectories=trajectories)
    q_pred, mc = q_vs_return(trajectories, cfg.gamma, is_atari(cfg.env_id))
    return {"eval/return_mean": mean, "eval/return_std": std, "eval/q_taken": q_pred, "eval/mc_return": mc}


def train_metrics(cfg: Config, counters: Counters, nets: QNets, replay: ReplayBuffer) -> dict:
    """The training part of a log line (the window since the last one, then reset) and the replay's Q diagnostics."""
    window, counters.since_log = counters.since_log, new_window()
    metrics: dict = {}
    if window["n"]:
        metrics.update({"loss/td": window["loss"] / window["n"], "q/mean": window["q"] / window["n"]})
    if window["returns"]:
        metrics.update({"train/episode_return": float(np.mean(window["returns"])),
                        "train/episode_length": float(np.mean(window["lengths"]))})
    diag = replay.sample_diagnostic(256) if counters.step > cfg.learning_starts else None
    if diag is not None:  # predicted max-Q vs the return that followed, on replayed states
        with torch.inference_mode():
            q_replay = nets.online(nets.tensor(diag[0]))
        metrics.update({"q/replay_max": q_replay.max(1).values.mean().item(), "q/replay_return": float(diag[2].mean())})
    return metrics


def save_checkpoint(cfg: Config, run: Run, nets: QNets, counters: Counters, rng: np.random.Generator,
                    replay: ReplayBuffer) -> None:
    with run.checkpoint(counters.step) as d:
        save_state(d / "state.pt", {"q_net": nets.online.state_dict(), "target_net": nets.target.state_dict(),
                                    "optimizer": nets.optimizer.state_dict(), "behaviour_rng": rng.bit_generator.state,
                                    **dataclasses.asdict(counters)})
        if cfg.save_buffer:
            replay.save(d / "replay.npz")


def train(cfg: Config) -> dict:
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, command_name(cfg))  # error before any write
    atari = is_atari(cfg.env_id)
    keep_freed_memory()
    torch.set_num_threads(cfg.torch_threads or ((os.cpu_count() or 1) if atari else 1))  # tiny MLPs: 1 is fastest
    seed_everything(cfg.seed, cfg.deterministic)
    env = make_env(cfg.env_id, cfg.seed)
    n_actions = int(env.action_space.n)
    nets = QNets(cfg, env.observation_space.shape, n_actions)
    replay = make_replay(cfg, env)
    rng = np.random.default_rng(cfg.seed)  # epsilon-greedy draws
    c = Counters()
    if resume is not None:
        with loading_checkpoint(resume):  # another network size, a damaged file: one clear error
            state = load_state(resume / "state.pt")  # also restores python / numpy / torch RNGs
            nets.online.load_state_dict(state["q_net"])
            nets.target.load_state_dict(state["target_net"])
            nets.weights_changed(online=True, target=True)
            nets.optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["behaviour_rng"]
            if (resume / "replay.npz").exists():  # save_buffer (resolve_checkpoint refused a checkpoint that lost it)
                replay.load(resume / "replay.npz")
            c = Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters)})
    run = Run(cfg, checkpoint=resume)  # after the checkpoint loaded: a bad one changes nothing
    arithmetic = precision(cfg, cnn=len(env.observation_space.shape) == 3)
    print(f"dqn {cfg.env_id}: {arithmetic} on {cfg.device}", file=sys.stderr)
    obs, _ = env.reset(seed=reset_seed(cfg, c.step))

    timer, start_step = Timer(), c.step
    next_save = (c.step // cfg.save_steps + 1) * cfg.save_steps if cfg.save_steps else None
    exploration_steps = cfg.exploration_fraction * cfg.total_timesteps
    bar = progress(cfg.total_timesteps, f"dqn {cfg.env_id}", enabled=cfg.progress, initial=c.step)
    while not c.stopped_early and c.step < cfg.total_timesteps:
        # one environment step
        epsilon = linear_schedule(cfg.start_e, cfg.end_e, exploration_steps, c.step)
        action = act(nets, rng, obs, epsilon, n_actions)
        next_obs, reward, terminated, truncated, info = env.step(action)
        replay.add(obs, action, reward, terminated, truncated, next_obs)
        c.step += 1
        if "episode" in info:  # Atari: only at the real end of a game, with the full unclipped score
            c.since_log["returns"].append(float(info["episode"]["r"]))
            c.since_log["lengths"].append(int(info["episode"]["l"]))
            c.episodes += 1
        save_now = False
        if terminated or truncated:  # checkpoints sit at episode ends; the next episode's reset is seeded
            save_now = next_save is not None and c.step >= next_save
            next_obs, _ = env.reset(seed=reset_seed(cfg, c.step) if save_now else None)
        obs = next_obs

        # learn, and follow with the target network
        if c.step > cfg.learning_starts and len(replay) >= cfg.batch_size:
            if c.step % cfg.train_frequency == 0:
                beta = linear_schedule(cfg.per_beta, 1.0, cfg.total_timesteps, c.step)
                nets.optimizer.param_groups[0]["lr"] = lr_at(cfg, c.step)  # a function of the step: resumes
                for _ in range(cfg.gradient_steps):
                    loss, q_mean = learn(cfg, nets, replay, beta)
                    c.since_log["loss"] += loss.item()
                    c.since_log["q"] += q_mean.item()
                    c.since_log["n"] += 1
                    c.n_updates += 1
                    if cfg.target_update_unit == "gradient_step" and c.n_updates % cfg.target_update_interval == 0:
                        update_target(cfg, nets)
                nets.weights_changed(online=True)
            if cfg.target_update_unit == "env_step" and c.step % cfg.target_update_interval == 0:
                update_target(cfg, nets)

        # evaluate, log, checkpoint
        metrics: dict = {}
        if cfg.eval_frequency and c.step % cfg.eval_frequency == 0 and c.step < cfg.total_timesteps:
            c.last_eval = evaluate_q(cfg, nets.acting, c.step)
            c.best_eval = max(c.best_eval, c.last_eval["eval/return_mean"])
            metrics.update(c.last_eval)
            c.stopped_early = cfg.stop_at_return is not None and c.last_eval["eval/return_mean"] >= cfg.stop_at_return
        if c.step % cfg.logging_steps == 0:
            metrics.update({"train/epsilon": epsilon, "train/lr": lr_at(cfg, c.step), "train/episodes": c.episodes,
                            "train/updates": c.n_updates,
                            "time/sps": (c.step - start_step) / max(timer.elapsed(), 1e-9)})
            metrics.update(train_metrics(cfg, c, nets, replay))
            bar.update(c.step - bar.n)
            bar.set_postfix(fmt_metrics({**c.last_eval, **metrics}, ["train/episode_return", "eval/return_mean",
                                                                      "loss/td", "q/mean", "train/epsilon"]))
        if metrics:
            run.log(c.step, metrics)
        if save_now:  # at the end of the step, so a resumed run starts exactly at the next one
            save_checkpoint(cfg, run, nets, c, rng, replay)
            next_save = (c.step // cfg.save_steps + 1) * cfg.save_steps
    bar.update(c.step - bar.n)
    bar.close()
    env.close()
    steps = c.step - start_step
    sps, cpu_sps = steps / max(timer.elapsed(), 1e-9), steps / max(timer.cpu_elapsed(), 1e-9)  # cpu: robust to load

    save_checkpoint(cfg, run, nets, c, rng, replay)  # before the final evaluation: a resume redoes just that
    final = c.last_eval if c.stopped_early else evaluate_q(cfg, nets.acting, c.step)
    best_eval = max(c.best_eval, final["eval/return_mean"])
    if not c.stopped_early:
        run.log(c.step, final)
    summary = {**final, "eval/best_return_mean": best_eval, "time/sps": sps, "time/cpu_sps": cpu_sps,
               "train/episodes": c.episodes, "train/updates": c.n_updates, "global_step": c.step, "env_id": cfg.env_id,
               "stopped_early": bool(c.stopped_early), "precision": arithmetic, "device": cfg.device}
    run.write_summary(summary)
    run.close()
    return summary
