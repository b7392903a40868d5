"""Models: the built-in presets (`builtin`), loaders (`loading`), LoRA and dropout-off for training (`prepare`),
SDPA with padded keys for short rows on CPU (`attention`), float32 linear layers in oneDNN on CPU (`linear`)."""

from rlhf.models.builtin import BUILTIN_MODELS, BUILTIN_SMALL, BUILTIN_TINY, builtin_config, save_builtin_tiny
from rlhf.models.loading import check_model_path, load_causal_lm, load_reward_model, load_tokenizer, reward_scores
from rlhf.models.prepare import apply_lora, disable_dropout

__all__ = ["BUILTIN_MODELS", "BUILTIN_SMALL", "BUILTIN_TINY", "apply_lora", "builtin_config", "check_model_path",
           "disable_dropout", "load_causal_lm", "load_reward_model", "load_tokenizer", "reward_scores",
           "save_builtin_tiny"]
