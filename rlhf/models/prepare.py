"""Ready a loaded model for training: LoRA adapters through peft, dropout off for RL."""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model

from rlhf.runtime import ConfigError


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Wrap `model` with LoRA adapters (peft); a sequence classifier also trains its `score` head."""
    is_classifier = model.__class__.__name__.endswith("ForSequenceClassification")
    target = list(target_modules) if not isinstance(target_modules, str) else target_modules
    if target == ["all-linear"]:  # peft's shorthand, given as a one-item list on the command line
        target = "all-linear"
    if isinstance(target, list):  # peft's rule for a list: a module whose name is the entry or ends with ".entry"
        names = [n for n, _ in model.named_modules() if n]
        for t in target:
            if not any(n == t or n.endswith(f".{t}") for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()  # leaves with weights
                                 if next(m.parameters(recurse=False), None) is not None and not any(m.children())})
                raise ConfigError(f"`lora_target_modules`: {t!r} matches no module of the model; its modules "
                                  f"include {', '.join(leaves[:20])}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM)
    return get_peft_model(model, config)


def disable_dropout(model):
    """Set every dropout probability in `model` to 0, in place (returns `model`), as TRL does for RL.

    PPO and GRPO compare passes over the same tokens made at different times and in different modes
    (the sampler and pi_old, PPO's old log-probs and values, the frozen reference in eval mode): with
    dropout on, the first ratio is not 1 and the KL to the reference is biased. Zeroes `nn.Dropout`
    modules (LoRA's too), float attributes that forward passes read (e.g. Llama's
    `attention_dropout`) and the config's fields (`attn_pdrop`, `hidden_dropout`, ...: a saved model
    says so as well); any float whose name contains "drop" (layerdrop, drop_path_rate) counts.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and "drop" in name.lower():
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if isinstance(value, float) and "drop" in name.lower():
                    setattr(config, name, 0.0)
    return model
