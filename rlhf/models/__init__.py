"""Models: the built-in tiny preset (`builtin`), loaders (`loading`), LoRA and dropout-off for training (`prepare`)."""

from rlhf.models.builtin import BUILTIN_TINY, save_builtin_tiny, tiny_config
from rlhf.models.loading import check_model_path, load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.prepare import apply_lora, disable_dropout

__all__ = ["BUILTIN_TINY", "apply_lora", "check_model_path", "disable_dropout", "load_causal_lm", "load_reward_model",
           "load_tokenizer", "save_builtin_tiny", "tiny_config"]
