"""PPO speed: ours vs Stable-Baselines3 PPO with matched hyper-parameters, side by side in one run.

Both: 1 env, horizon 2048, 10 epochs of minibatch 64, Adam 3e-4, GAE 0.95, clip 0.2, 64-64 tanh
actor and critic (separate), state-independent log-std, no observation / reward normalisation
(SB3's defaults), torch 1 thread, CPU. Timed: the whole training call (building the model and
envs included) for `--steps` environment steps; each pair is run `--repeats` times alternating
ours / SB3 and the best time of each is kept (the machine is shared, so take the ratio).

    pip install -e .[bench]       # stable-baselines3
    python scripts/bench_ppo.py   # CartPole-v1 and Hopper-v5, 3 rollouts of 2048 steps each
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def ours(env_id: str, steps: int, seed: int) -> float:
    from classic import ppo
    from rlhf.runtime import make_config

    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(ppo.Config, dict(
            env_id=env_id, total_timesteps=steps, num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=10,
            learning_rate=3e-4, anneal_lr=False, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, clip_vloss=False, ent_coef=0.0,
            vf_coef=0.5, max_grad_norm=0.5, norm_obs=False, norm_reward=False, hidden_sizes=[64, 64], activation="tanh",
            seed=seed, output_dir=d, eval_episodes=0, progress=False, report_to="none", torch_threads=1))
        start = time.perf_counter()
        ppo.train(cfg)
        return time.perf_counter() - start


def sb3(env_id: str, steps: int, seed: int) -> float:
    import gymnasium as gym
    from stable_baselines3 import PPO

    start = time.perf_counter()
    model = PPO("MlpPolicy", gym.make(env_id), n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed, device="cpu",
                policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh))
    model.learn(total_timesteps=steps)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="CartPole-v1,Hopper-v5")
    p.add_argument("--steps", type=int, default=3 * 2048)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    ours("CartPole-v1", 2048, 0)  # warm-up: imports and first-call costs are not what we measure
    sb3("CartPole-v1", 2048, 0)
    rows = []
    for env_id in args.envs.split(","):
        t_ours, t_sb3 = float("inf"), float("inf")
        for r in range(args.repeats):
            t_ours = min(t_ours, ours(env_id, args.steps, r))
            t_sb3 = min(t_sb3, sb3(env_id, args.steps, r))
        rows.append((env_id, args.steps / t_ours, args.steps / t_sb3))
    print(f"\nPPO steps/s, {args.steps} steps, best of {args.repeats} (torch threads 1, CPU)\n")
    print("| env | ours | SB3 | ours / SB3 |")
    print("|---|---:|---:|---:|")
    for env_id, a, b in rows:
        print(f"| {env_id} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
