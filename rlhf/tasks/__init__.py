"""Built-in offline tasks: prompt generators, gold scorers, reward functions, data writers.

`arithmetic` is the default task of every `rlhf` stage when no `--dataset_name` is given.
"""

from rlhf.tasks import arithmetic

__all__ = ["arithmetic"]
