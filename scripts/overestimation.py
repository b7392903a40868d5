"""Over-estimation in Q-learning, and how the double estimator removes it (van Hasselt et al. 2016).

    python scripts/overestimation.py                      # both parts, ~ a few minutes on 2 cores
    python scripts/overestimation.py --skip_env           # part (a) only, seconds

(a) Function approximation (van Hasselt et al. 2016, section 3 and Fig. 2): the true action values
are the same for all actions, Q(s, a) = V(s) = sin(s) on s in [-6, 6]. For each action a
degree-6 polynomial is fitted to noisy samples (sd 0.5) of V at the integers -6..6 less two
adjacent ones that differ between actions. Every fit is
unbiased-ish, yet max_a Q_hat(s, a) - max_a Q(s, a) is positive on average and grows with the
number of actions. The double estimator — pick the argmax with one set of fits, value it with an
independent second set — has no such upward bias.

(b) DQN vs Double DQN on CartPole-v1 (a short run each, config configs/classic/dqn_cartpole.yaml):
at every evaluation, the mean predicted Q(s, a) of the greedy policy next to the discounted return
that actually followed (`eval/q_taken`, `eval/mc_return`; see classic/dqn.py).

Prints tables and writes a PNG (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from classic import dqn
from rlhf.runtime import load_yaml_config, make_config, read_jsonl


def function_approximation(n_actions_list=(1, 2, 4, 6, 8, 10), degree=6, noise=0.5, repeats=200,
                           seed=0) -> list[dict]:
    """Mean over states and repeats of max_a Q_hat - max_a Q (single) and of the double estimate - max_a Q."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-6, 6, 241)
    true_v = np.sin(grid)  # max_a Q(s, a) = V(s): all actions are equally good

    def fits(n_actions: int) -> np.ndarray:  # (A, S): one noisy polynomial regression per action
        out = np.empty((n_actions, len(grid)))
        for a in range(n_actions):
            gap = rng.integers(-6, 6)  # as in the paper: the integers -6..6 minus two adjacent ones, per action
            xs = np.array([x for x in range(-6, 7) if x not in (gap, gap + 1)], dtype=float)
            ys = np.sin(xs) + noise * rng.normal(size=len(xs))
            poly = np.polynomial.Polynomial.fit(xs, ys, degree)
            out[a] = poly(grid)
        return out

    rows = []
    for n_actions in n_actions_list:
        single, double = [], []
        for _ in range(repeats):
            qa, qb = fits(n_actions), fits(n_actions)
            single.append((qa.max(0) - true_v).mean())
            best = qa.argmax(0)  # (S,) argmax from the first estimator ...
            double.append((qb[best, np.arange(len(grid))] - true_v).mean())  # ... valued by the second
        rows.append({"actions": n_actions,
                     "single": float(np.mean(single)), "single_se": float(np.std(single) / np.sqrt(repeats)),
                     "double": float(np.mean(double)), "double_se": float(np.std(double) / np.sqrt(repeats))})
    return rows


# Part (b) studies the max operator of the DQN / Double DQN targets as the papers define them: one-step targets, a
# target network copied after each training round and a constant learning rate, whatever the config does for a stable
# end of run (dqn_cartpole.yaml's running-average target and decaying rate slow the bootstrapping, and with it the
# Q-values; its 3-step targets would put 3 rewards and a gamma^3-discounted max in every target).
PAPER_TARGET = {"target_update_unit": "env_step", "target_update_interval": 10, "tau": 1.0, "end_learning_rate": None,
                "n_step": 1}


def dqn_vs_double(steps: int, seed: int, out: Path, config: str) -> dict[str, list[dict]]:
    base = {**load_yaml_config(config, dqn.Config), **PAPER_TARGET}
    curves = {}
    for name, double in (("DQN", False), ("Double DQN", True)):
        run_dir = out / name.replace(" ", "_").lower()
        cfg = make_config(dqn.Config, {**base, "double_q": double, "total_timesteps": steps, "seed": seed,
                                       "eval_frequency": max(steps // 8, 1), "output_dir": str(run_dir),
                                       "overwrite": True, "progress": False, "report_to": "none", "save_buffer": False})
        dqn.train(cfg)
        curves[name] = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/q_taken" in r]
    return curves


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40_000, help="environment steps per CartPole run in part (b)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", default="configs/classic/dqn_cartpole.yaml")
    p.add_argument("--out", default="runs/overestimation")
    p.add_argument("--skip_env", action="store_true", help="only part (a)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = function_approximation()
    print("(a) function approximation: mean over s of [estimate of max_a Q(s,a)] - max_a Q(s,a)  "
          "(true Q = sin(s) for every a)")
    print("| actions | single estimator max_a Q_hat | double estimator |\n|---|---|---|")
    for r in rows:
        print(f"| {r['actions']} | {r['single']:+.3f} ± {r['single_se']:.3f} | "
              f"{r['double']:+.3f} ± {r['double_se']:.3f} |")

    curves = {} if args.skip_env else dqn_vs_double(args.steps, args.seed, out, args.config)
    if curves:
        print(f"\n(b) CartPole-v1, seed {args.seed}: greedy-policy Q(s,a) predicted vs discounted return obtained")
        print("| step | DQN Q | DQN return | DQN eval score | Double Q | Double return | Double eval score |\n"
              "|---|---|---|---|---|---|---|")
        for a, b in zip(curves["DQN"], curves["Double DQN"]):
            print(f"| {a['step']} | {a['eval/q_taken']:.1f} | {a['eval/mc_return']:.1f} | {a['eval/return_mean']:.0f} "
                  f"| {b['eval/q_taken']:.1f} | {b['eval/mc_return']:.1f} | {b['eval/return_mean']:.0f} |")
        for name, c in curves.items():
            gap = np.mean([r["eval/q_taken"] - r["eval/mc_return"] for r in c])
            print(f"{name}: mean (predicted - obtained) over evaluations = {gap:+.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    acts = [r["actions"] for r in rows]
    ax.errorbar(acts, [r["single"] for r in rows], [r["single_se"] for r in rows], marker="o",
                label="max_a Q_hat (single)")
    ax.errorbar(acts, [r["double"] for r in rows], [r["double_se"] for r in rows], marker="s", label="double estimator")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("number of actions")
    ax.set_ylabel("mean estimate - true max")
    ax.set_title("(a) polynomial fits, true Q = sin(s)")
    ax.legend()
    if curves:
        ax = axes[0, 1]
        for (name, c), color in zip(curves.items(), ("tab:red", "tab:blue")):
            steps = [r["step"] for r in c]
            ax.plot(steps, [r["eval/q_taken"] for r in c], color=color, label=f"{name}: predicted Q")
            ax.plot(steps, [r["eval/mc_return"] for r in c], color=color, ls="--", label=f"{name}: return obtained")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("discounted value")
        ax.set_title("(b) CartPole-v1, greedy policy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "overestimation.png", dpi=120)
    print(f"\nplot: {out / 'overestimation.png'}")


if __name__ == "__main__":
    main()
