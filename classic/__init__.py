"""classic: deep RL on gymnasium environments (DQN family, vanilla PG, PPO variants, TRPO)."""

__version__ = "0.1.0"
