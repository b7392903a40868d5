"""Load policies, reference, reward models and tokenizers; LoRA through peft; the built-in tiny preset.

`builtin:tiny` is a ~0.2M-parameter Llama (transformers' `LlamaForCausalLM`, built from a config with a
fixed seed) and a character-level tokenizer (a `tokenizers` WordLevel model over single characters,
wrapped as a fast tokenizer). Nothing is downloaded; `save_builtin_tiny(d)` writes both in Hugging
Face format, after which `AutoTokenizer.from_pretrained(d)` / `AutoModelForCausalLM.from_pretrained(d)`
load them with no project code. Every other name goes through the ordinary `Auto*` loaders.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path

import torch

from rlhf.runtime import ConfigError, meant_as_local_path

logger = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"

# One token per printable ASCII character (+ newline) after the specials: ids are stable across runs.
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHARS = list(string.printable[:95]) + ["\n"]
# A minimal chat template: `<|role|>content\n` per message; an assistant turn ends with EOS instead of the newline.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Small enough to train on the arithmetic task in a minute or two on 2 CPU cores.
_TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6)
_TINY_SEED = 1234

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ConfigError(f"`dtype`: expected one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


MODEL_FILES = ("config.json", "adapter_config.json")  # a model, or a LoRA adapter on one
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")  # old vocab files come with a config


def check_model_path(name_or_path: str, option: str = "", files: tuple[str, ...] = MODEL_FILES) -> bool:
    """Fail at once, naming the path, on a local model that is missing, empty or a file; True if local.

    A missing name is left to the hub only if it could be a hub id (`gpt2`, `org/name`; see
    `meant_as_local_path`). A local directory must hold one of `files`.
    """
    where = f"`{option}`: " if option else ""
    if name_or_path.startswith("builtin:"):
        if name_or_path != BUILTIN_TINY:
            raise ConfigError(f"{where}unknown built-in model {name_or_path!r} (there is {BUILTIN_TINY})")
        return False
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if meant_as_local_path(name_or_path):
            raise ConfigError(f"{where}no such model directory: {name_or_path}")
        return False
    if not path.is_dir():
        raise ConfigError(f"{where}{name_or_path} is a file; expected a model directory (with config.json)")
    if not any((path / f).is_file() for f in files):
        what = "is empty" if not any(path.iterdir()) else f"has no {' or '.join(files)}"
        raise ConfigError(f"{where}{name_or_path} {what}: not a Hugging Face model directory (save_pretrained writes one)")
    return True


def _from_pretrained(loader, name_or_path: str, files: tuple[str, ...] = MODEL_FILES, **kwargs):
    """`loader.from_pretrained` after `check_model_path`; a hub name that fails to load is a ConfigError naming it."""
    local = check_model_path(name_or_path, files=files)
    name_or_path = str(Path(name_or_path).expanduser()) if local else name_or_path
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        if local:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name_or_path}: no such local directory, and loading it from the Hugging Face hub failed: "
                          f"{first}") from None


def _tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=_CHAT_TEMPLATE, model_max_length=_TINY["max_position_embeddings"])


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    """The tokenizer of `name_or_path`; one without a pad token gets pad = eos (logged); neither is an error."""
    from transformers import AutoTokenizer

    if name_or_path == BUILTIN_TINY:
        tokenizer = _tiny_tokenizer()
    else:
        tokenizer = _from_pretrained(AutoTokenizer, name_or_path, files=TOKENIZER_FILES)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {name_or_path!r} has neither a pad token nor an EOS token; "
                              "add a pad token to it (tokenizer.add_special_tokens) and save it again")
        logger.warning("tokenizer of %r has no pad token: using its EOS token %r for padding", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_config():
    from transformers import LlamaConfig

    tok = _tiny_tokenizer()
    return LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **_TINY)


def _build_tiny(model_cls, **overrides):
    """A freshly initialised tiny model; the same weights every call (fixed seed, caller's RNG untouched)."""
    config = tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    from rlhf.distributed import transformers_zero3_off

    # full weights even under a ZeRO-3 launch: the sequence-classification constructor builds its
    # body through from_config, which would otherwise shard it mid-construction and break init
    with torch.random.fork_rng(devices=[]), transformers_zero3_off():
        torch.manual_seed(_TINY_SEED)
        model = model_cls(config)
    return model


def _finish(model, gradient_checkpointing: bool):
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_causal_lm(name_or_path: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                   trust_remote_code: bool = False):
    """A causal LM: the built-in tiny Llama or `AutoModelForCausalLM.from_pretrained(name_or_path)`."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

    if name_or_path == BUILTIN_TINY:
        model = _build_tiny(LlamaForCausalLM)
        if dtype not in ("auto", "float32"):
            model = model.to(_dtype(dtype))
        cfg = model.config
        model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                                   pad_token_id=cfg.pad_token_id, do_sample=False)
    else:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    return _finish(model, gradient_checkpointing)


def load_reward_model(name_or_path: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                      trust_remote_code: bool = False, trained: bool = False):
    """A sequence classifier with one output, read at the last non-padding token.

    From a causal-LM checkpoint (e.g. an SFT model) the body is reused and the `score` head is new
    (initialised from the caller's RNG, so seed first). `trained=True` (scoring: PPO's reward model,
    `rlhf reward score`) refuses such a checkpoint, whose scores would be random. `pad_token_id` must
    be in the config: the model finds each sequence's last real token by it.
    """
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    if name_or_path == BUILTIN_TINY:
        if trained:
            raise ConfigError(f"{BUILTIN_TINY} is an untrained model: score with a reward model trained by `rlhf reward`")
        model = _build_tiny(LlamaForSequenceClassification, num_labels=1)
        if dtype not in ("auto", "float32"):
            model = model.to(_dtype(dtype))
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected from a causal-LM checkpoint
        try:
            model, info = _from_pretrained(AutoModelForSequenceClassification, name_or_path, num_labels=1,
                                           dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
                                           output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        # Weights missing outside the body (`model.`) are the head's: newly initialised, so untrained.
        head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(f"{model.base_model_prefix}."))
        if trained and head_missing:
            raise ConfigError(f"{name_or_path} is not a trained reward model: its checkpoint has no score head "
                              f"({', '.join(head_missing)} missing; a causal LM?). Train one with `rlhf reward`")
        if model.config.pad_token_id is None:
            tokenizer = load_tokenizer(name_or_path) if Path(name_or_path).is_dir() or "/" in name_or_path else None
            if tokenizer is None or tokenizer.pad_token_id is None:
                raise ConfigError(f"reward model {name_or_path!r}: config has no pad_token_id and the tokenizer has none")
            model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, gradient_checkpointing)


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Wrap `model` with LoRA adapters (peft); a sequence classifier also trains its `score` head."""
    from peft import LoraConfig, TaskType, get_peft_model

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


def save_builtin_tiny(out_dir: str | os.PathLike) -> Path:
    """Write the untrained tiny model and its tokenizer in Hugging Face format (safetensors)."""
    out_dir = Path(out_dir)
    load_causal_lm(BUILTIN_TINY).save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(BUILTIN_TINY).save_pretrained(out_dir)
    return out_dir


__all__ = ["BUILTIN_TINY", "apply_lora", "check_model_path", "disable_dropout", "load_causal_lm", "load_reward_model",
           "load_tokenizer", "save_builtin_tiny", "tiny_config"]
