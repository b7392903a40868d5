"""rlhf: fine-tune language models from human feedback (SFT, reward model, PPO, GRPO).

`rlhf.core` holds the policy-optimisation math shared with the `classic` package.
"""

__version__ = "0.1.0"
