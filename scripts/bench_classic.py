"""Training speed of `classic` vs Stable-Baselines3, side by side in one run, matched hyper-parameters.

    pip install -e ".[bench]"        # stable-baselines3
    python scripts/bench_classic.py --algos dqn --envs cartpole,breakout
    python scripts/bench_classic.py --algos ppo --envs cartpole,hopper
    python scripts/bench_classic.py --algos ppo,ppo_compile --envs cartpole,hopper --steps_scale 2
    python scripts/bench_classic.py --algos dqn --envs breakout --sb3_python /work/sb3-env/bin/python

Each (algorithm, env) row trains ours and SB3's for the same number of environment steps with the
same hyper-parameters, network and torch thread count, in two fresh processes started at the same
time (so both see the same machine load), and prints env steps per second — per wall-clock second
and per CPU second of the process (robust on a shared, overloaded machine) — and the ratios
ours / SB3. `--sb3_python` runs SB3's side in another environment's interpreter (one with
stable-baselines3, where this one may not have it). DQN on Atari runs ours twice, in fp32 and with
`--bf16 true` (bfloat16 autocast, fp32 master weights), next to one SB3 run (fp32, SB3 has no mixed
precision), all three at the same time; both of ours use their default channels-last CNN.
DQN: ours counts its whole training loop (acting, env stepping, replay, gradient steps),
SB3 its `learn()` call. PPO: both count the rollouts after the first two (acting, env stepping,
GAE, the update, logging) and print what the first two cost apart (setup, warm-up, any compile).
See "What each side's clocks cover" below for the details.

`ppo_compile` is ours with `--compile true` (torch.compile'd minibatch loss and its backward pass)
against a fresh SB3 run. It compiles from an empty cache, in its own process (its C++ compiler
runs count as its CPU time), during its first update: that lands in the first two rollouts' cost.

One function per algorithm (`bench_dqn`, `bench_ppo`) returns rows; a new algorithm is a function
plus an entry in BENCHES.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# What each side's clocks cover (DQN): SB3 times its `learn()` call (its model, optimiser and env are
# built before). Ours reports the wall and CPU time of its training loop (`time/sps`, `time/cpu_sps` in
# the summary): not setup, not the final evaluation (for an untrained Atari policy that can be a whole
# 27k-step game); the loop's own checkpoints are inside the clock. PPO: see PPO_CLOCKS.

# --- DQN ---------------------------------------------------------------------------------------
# Matched settings: SB3's DQN defaults where they exist (train every 4 steps, 1 gradient step,
# Huber loss, grad-norm clip 10, hard target copy), Nature CNN on Atari, [64, 64] MLP on CartPole.
# One torch thread per side everywhere: the two run at the same time, and 2 x 2 threads on a 2-core
# machine made both ~12x slower (busy-waiting OpenMP threads), which measured the contention, not the code.
# `precisions`: ours' rows (bf16 only where the matmuls are big enough to gain: the Nature CNN).
DQN_SETTINGS = {
    "cartpole": dict(env_id="CartPole-v1", steps=30_000, threads=1, hidden=[64, 64], buffer_size=50_000,
                     learning_starts=1_000, batch_size=64, target_update_interval=1_000, learning_rate=1e-3,
                     precisions=["fp32"]),
    "breakout": dict(env_id="BreakoutNoFrameskip-v4", steps=3_000, threads=1, hidden=[64, 64], buffer_size=10_000,
                     learning_starts=1_000, batch_size=32, target_update_interval=1_000, learning_rate=1e-4,
                     precisions=["fp32", "bf16"]),
}

OURS_DQN = """
import json, sys, torch
from classic import dqn
from rlhf.runtime import make_config
s = json.loads(sys.argv[1])
cfg = make_config(dqn.Config, dict(
    env_id=s["env_id"], total_timesteps=s["steps"], learning_rate=s["learning_rate"], buffer_size=s["buffer_size"],
    batch_size=s["batch_size"], learning_starts=s["learning_starts"], train_frequency=4, gradient_steps=1,
    target_update_interval=s["target_update_interval"], exploration_fraction=0.1, end_e=0.05, hidden_sizes=s["hidden"],
    loss="huber", max_grad_norm=10.0, eval_frequency=0, eval_episodes=1, eval_epsilon=0.05, torch_threads=s["threads"],
    output_dir=s["out"], progress=False, report_to="none", save_buffer=False, logging_steps=1000, bf16=s["bf16"]))
summary = dqn.train(cfg)
print(json.dumps({"sps": summary["time/sps"], "cpu_sps": summary["time/cpu_sps"]}))  # the training loop only
"""

SB3_DQN = """
import json, sys, time, torch
s = json.loads(sys.argv[1])
torch.set_num_threads(s["threads"])
from stable_baselines3 import DQN
if s["env_id"].startswith(("Breakout", "Pong")):
    import ale_py, gymnasium as gym
    gym.register_envs(ale_py)
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack
    env = VecFrameStack(make_atari_env(s["env_id"], n_envs=1, seed=1), n_stack=4)
    policy, kwargs = "CnnPolicy", {}
else:
    import gymnasium as gym
    env = gym.make(s["env_id"])
    policy, kwargs = "MlpPolicy", {"net_arch": s["hidden"]}
model = DQN(policy, env, learning_rate=s["learning_rate"], buffer_size=s["buffer_size"],
            learning_starts=s["learning_starts"], batch_size=s["batch_size"], train_freq=4, gradient_steps=1,
            target_update_interval=s["target_update_interval"], exploration_fraction=0.1,
            exploration_final_eps=0.05, max_grad_norm=10.0, policy_kwargs=kwargs, seed=1, device="cpu", verbose=0)
t, c = time.perf_counter(), time.process_time()
model.learn(total_timesteps=s["steps"])
print(json.dumps({"sps": s["steps"] / (time.perf_counter() - t), "cpu_sps": s["steps"] / (time.process_time() - c)}))
"""


def _run_all(jobs: list[tuple[str, str, dict]]) -> list[dict]:
    """Run every (python, code, settings) job at the same time, so all see the same machine load; return
    their speeds.

    torch.compile (ours with `compile`) starts from an empty cache and compiles in its own process, so
    the whole cost of compiling lands in ours' clocks (its C++ compiler runs are added to its CPU time).
    """
    procs = []
    for python, code, settings in jobs:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=settings["out"] + "_inductor_cache",
                   TORCHINDUCTOR_COMPILE_THREADS="1")
        procs.append(subprocess.Popen([python, "-c", code, json.dumps(settings)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err[-3000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def bench_dqn(envs: list[str], steps_scale: float, sb3_python: str) -> list[dict]:
    rows = []
    for name in [e for e in envs if e in DQN_SETTINGS]:
        s = dict(DQN_SETTINGS[name])
        s["steps"] = int(s["steps"] * steps_scale)
        with tempfile.TemporaryDirectory() as tmp:
            ours_jobs = [(sys.executable, OURS_DQN, dict(s, bf16=p == "bf16", out=f"{tmp}/{p}"))
                         for p in s["precisions"]]
            *ours_runs, sb3 = _run_all(ours_jobs + [(sb3_python, SB3_DQN, dict(s, out=f"{tmp}/sb3"))])
        for precision, ours in zip(s["precisions"], ours_runs):
            rows.append({"algo": f"dqn ({precision})", "env": s["env_id"], "steps": s["steps"], "threads": s["threads"],
                         "ours_sps": ours["sps"], "sb3_sps": sb3["sps"], "ratio": ours["sps"] / sb3["sps"],
                         "ours_cpu_sps": ours["cpu_sps"], "sb3_cpu_sps": sb3["cpu_sps"],
                         "cpu_ratio": ours["cpu_sps"] / sb3["cpu_sps"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --- PPO ---------------------------------------------------------------------------------------
# Matched settings: SB3's PPO defaults (1 env, horizon 2048, 10 epochs of minibatch 64, Adam 3e-4,
# GAE 0.95, clip 0.2, no value clipping, separate 64-64 tanh actor and critic, state-independent
# log-std, no observation / reward normalisation, no learning-rate annealing). Target: ours >= 2x SB3.
# Both sides mark the end of every rollout + update; the rate is over the rollouts after the first
# `warmup` ones (as the GRPO benchmark skips its first steps), and what those first ones cost (ours:
# from before `ppo.train`, setup and any compile included; SB3: from the start of `learn()`) is
# printed next to it, so the cost of a run of any length follows from the two.
PPO_SETTINGS = {
    "cartpole": dict(env_id="CartPole-v1", steps=10 * 2048, threads=1),
    "hopper": dict(env_id="Hopper-v5", steps=10 * 2048, threads=1),
}

PPO_CLOCKS = """
import json, resource, sys, time
s = json.loads(sys.argv[1])
def now():  # wall, CPU of this process and of its finished children (torch.compile's C++ compiler runs)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime
def report(marks):  # marks: before training, then after each rollout + update
    w = s["warmup"]
    (t0, c0), (tw, cw), (tn, cn) = marks[0], marks[w], marks[-1]
    steps = (len(marks) - 1 - w) * 2048
    print(json.dumps({"sps": steps / (tn - tw), "cpu_sps": steps / (cn - cw), "warmup_cpu_s": cw - c0}))
"""

OURS_PPO = PPO_CLOCKS + """
import torch
from classic import onpolicy, ppo
from rlhf.runtime import make_config
cfg = make_config(ppo.Config, dict(
    env_id=s["env_id"], total_timesteps=s["steps"], num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10,
    learning_rate=3e-4, anneal_lr=False, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, clip_vloss=False, ent_coef=0.0,
    vf_coef=0.5, max_grad_norm=0.5, norm_obs=False, norm_reward=False, hidden_sizes=[64, 64], activation="tanh",
    torch_threads=s["threads"], eval_episodes=0, output_dir=s["out"], progress=False, report_to="none",
    compile=s["compile"]))
marks, end_iteration = [now()], onpolicy.Loop.end_iteration
def marked_end_iteration(*args, **kwargs):
    end_iteration(*args, **kwargs)
    marks.append(now())
onpolicy.Loop.end_iteration = marked_end_iteration
ppo.train(cfg)
report(marks)
"""

SB3_PPO = PPO_CLOCKS + """
import torch
torch.set_num_threads(s["threads"])
import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
class Marks(BaseCallback):
    def _on_rollout_start(self):  # the previous rollout's update is done
        if self.num_timesteps:
            marks.append(now())
    def _on_step(self):
        return True
model = PPO("MlpPolicy", gym.make(s["env_id"]), n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4,
            gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=1,
            device="cpu", verbose=0,
            policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh))
marks = [now()]
model.learn(total_timesteps=s["steps"], callback=Marks())
marks.append(now())
report(marks)
"""


def bench_ppo(envs: list[str], steps_scale: float, sb3_python: str, compile: bool = False,
              warmup: int = 2) -> list[dict]:
    rows = []
    for name in [e for e in envs if e in PPO_SETTINGS]:
        s = dict(PPO_SETTINGS[name], compile=compile, warmup=warmup)
        s["steps"] = max((warmup + 1) * 2048, int(s["steps"] * steps_scale) // 2048 * 2048)  # whole rollouts
        with tempfile.TemporaryDirectory() as tmp:
            ours, sb3 = _run_all([(sys.executable, OURS_PPO, dict(s, out=f"{tmp}/ours")),
                                  (sb3_python, SB3_PPO, dict(s, out=f"{tmp}/sb3"))])
        rows.append({"algo": "ppo (compile)" if compile else "ppo", "env": s["env_id"], "steps": s["steps"],
                     "threads": s["threads"],
                     "ours_sps": ours["sps"], "sb3_sps": sb3["sps"], "ratio": ours["sps"] / sb3["sps"],
                     "ours_cpu_sps": ours["cpu_sps"], "sb3_cpu_sps": sb3["cpu_sps"],
                     "cpu_ratio": ours["cpu_sps"] / sb3["cpu_sps"],
                     "warmup": f"{warmup} rollouts: {ours['warmup_cpu_s']:.1f} / {sb3['warmup_cpu_s']:.1f} CPU-s"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_ppo_compile(envs: list[str], steps_scale: float, sb3_python: str) -> list[dict]:
    """Ours with `compile: true` (its one-time compile counted in its clock) against the same SB3 run."""
    return bench_ppo(envs, steps_scale, sb3_python, compile=True)


BENCHES = {"dqn": bench_dqn, "ppo": bench_ppo, "ppo_compile": bench_ppo_compile}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default="dqn", help=f"comma-separated, of: {', '.join(BENCHES)}")
    p.add_argument("--envs", default="cartpole,breakout")
    p.add_argument("--steps_scale", type=float, default=1.0, help="multiply every row's step budget")
    p.add_argument("--sb3_python", default=sys.executable,
                   help="Python interpreter of SB3's side (an environment with stable-baselines3); default: this one")
    args = p.parse_args(argv)
    rows = []
    for algo in args.algos.split(","):
        rows += BENCHES[algo]([e for e in args.envs.split(",") if e], args.steps_scale, args.sb3_python)
    print("\n| algo | env | steps | threads | ours steps/s (wall) | SB3 steps/s (wall) | ratio (wall) "
          "| ours steps/CPU-s | SB3 steps/CPU-s | ratio (CPU) | not timed: ours / SB3 |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algo']} | {r['env']} | {r['steps']} | {r['threads']} | {r['ours_sps']:.0f} | {r['sb3_sps']:.0f} "
              f"| {r['ratio']:.2f}x | {r['ours_cpu_sps']:.0f} | {r['sb3_cpu_sps']:.0f} | {r['cpu_ratio']:.2f}x "
              f"| {r.get('warmup', 'setup')} |")


if __name__ == "__main__":
    main()
