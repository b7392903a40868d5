"""`classic dqn|pg|ppo|trpo|plot ...` — deep RL on gymnasium environments."""

from __future__ import annotations

from rlhf.cli import dispatch

COMMANDS = {
    "dqn": ("classic.dqn", "DQN, Double DQN, Dueling DQN (mean/max), prioritised replay, n-step."),
    "pg": ("classic.pg", "Vanilla policy gradient (REINFORCE), with or without a value baseline."),
    "ppo": ("classic.ppo", "PPO: clip, adaptive KL penalty, fixed KL penalty, or no clip."),
    "trpo": ("classic.trpo", "TRPO: KL-constrained natural gradient, or KL-penalised with a dual update."),
    "plot": ("rlhf.plot", "Plot curves from metrics.jsonl of one or more runs."),
}


def main(argv: list[str] | None = None) -> None:
    dispatch("classic", COMMANDS, argv)


if __name__ == "__main__":
    main()
