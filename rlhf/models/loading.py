"""Load policies, reference, reward models and tokenizers: a built-in model (`builtin:tiny`, `builtin:small`), or a
local directory or hub name through the ordinary `Auto*` loaders (a local path that is missing, empty or a file fails
at once)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaForSequenceClassification)
from transformers.utils import logging as hf_logging

from rlhf.core import logprobs_from_logits
from rlhf.models.builtin import BUILTIN_MODELS, build_builtin, builtin_causal_lm, tiny_tokenizer
from rlhf.runtime import ConfigError, check, meant_as_local_path

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str):
    if dtype != "auto" and dtype not in _DTYPES:
        raise ConfigError(f"`dtype`: expected one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES.get(dtype, "auto")


MODEL_FILES = ("config.json", "adapter_config.json")  # a model, or a LoRA adapter on one
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")  # old vocab files come with a config


def check_model_path(name_or_path: str, option: str = "", files: tuple[str, ...] = MODEL_FILES) -> bool:
    """Fail at once, naming the path, on a local model that is missing, empty or a file; True if local.

    A missing name is left to the hub only if it could be a hub id (`gpt2`, `org/name`; see
    `meant_as_local_path`). A local directory must hold one of `files`.
    """
    where = f"`{option}`: " if option else ""
    if name_or_path.startswith("builtin:"):
        if name_or_path not in BUILTIN_MODELS:
            raise ConfigError(f"{where}unknown built-in model {name_or_path!r} (there are {', '.join(BUILTIN_MODELS)})")
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
        raise ConfigError(f"{where}{name_or_path} {what}: not a Hugging Face model directory "
                          "(save_pretrained writes one)")
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


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    """The tokenizer of `name_or_path`; one without a pad token gets pad = eos (logged); neither is an error."""
    if name_or_path in BUILTIN_MODELS:
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = _from_pretrained(AutoTokenizer, name_or_path, files=TOKENIZER_FILES)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {name_or_path!r} has neither a pad token nor an EOS token; "
                              "add a pad token to it (tokenizer.add_special_tokens) and save it again")
        logger.warning("tokenizer of %r has no pad token: using its EOS token %r for padding", name_or_path,
                       tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _finish(model, gradient_checkpointing: bool, dtype: str | None = None):
    if dtype not in (None, "auto", "float32"):  # a built-in model (built in float32); from_pretrained casts the others
        model = model.to(_dtype(dtype))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_causal_lm(name_or_path: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                   trust_remote_code: bool = False):
    """A causal LM: a built-in Llama or `AutoModelForCausalLM.from_pretrained(name_or_path)`."""
    if name_or_path in BUILTIN_MODELS:
        return _finish(builtin_causal_lm(name_or_path), gradient_checkpointing, dtype)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=_dtype(dtype),
                             trust_remote_code=trust_remote_code)
    return _finish(model, gradient_checkpointing)


def expand_layers(model, n: int):
    """Block expansion (LLaMA Pro, Wu et al. 2024): stack `n` copies of the last decoder layer on top, each
    with its output projections (o_proj, down_proj) zeroed, so the model computes exactly what it did before.

    Meant for a reward model started from an SFT model, which predicts the next token at its last layer: no
    layer of it can compare that prediction with the token written one position later, the new layers can
    (on the built-in task they did not learn to; results/rlhf_reward_model.md). Llama-family bodies
    (`model.<base>.layers`, each with `self_attn.o_proj` and `mlp.down_proj`); `config.num_hidden_layers`
    grows, so `save_pretrained` writes a plain model that loads back as one. Returns the model (changed in place).
    """
    check(n >= 0, "expand_layers", f"must be >= 0, got {n}")
    if n == 0:
        return model
    layers = getattr(model.base_model, "layers", None)
    last = layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
    attn, mlp = getattr(last, "self_attn", None), getattr(last, "mlp", None)
    if not (isinstance(getattr(attn, "o_proj", None), torch.nn.Linear)
            and isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear)):
        raise ConfigError(f"`expand_layers`: supported for Llama-family models (decoder layers with self_attn.o_proj "
                          f"and mlp.down_proj); {model.config.model_type!r} has none")
    config = model.config
    for _ in range(n):
        new = copy.deepcopy(last)
        with torch.no_grad():
            for proj in (new.self_attn.o_proj, new.mlp.down_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
        new.self_attn.layer_idx = len(layers)  # its slot in a KV cache
        layers.append(new)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Mistral, ...)
        config.layer_types = config.layer_types + [config.layer_types[-1]] * n
    return model


def load_reward_model(name_or_path: str, dtype: str = "float32", gradient_checkpointing: bool = False,
                      trust_remote_code: bool = False, trained: bool = False, expand: int = 0,
                      logprob_coef: float | None = None):
    """A sequence classifier with one output, read at the last non-padding token.

    From a causal-LM checkpoint (e.g. an SFT model) the body is reused and the `score` head is new
    (initialised from the caller's RNG, so seed first). `trained=True` (scoring: PPO's reward model,
    `rlhf reward score`) refuses such a checkpoint, whose scores would be random. `pad_token_id` must
    be in the config: the model finds each sequence's last real token by it. `expand` > 0 adds that many
    identity-initialised decoder layers on top (`expand_layers`). `logprob_coef` (training) is written to
    the config, where `reward_scores` reads it; None keeps the checkpoint's.
    """
    if name_or_path in BUILTIN_MODELS:
        if trained:
            raise ConfigError(f"{name_or_path} is an untrained model: score with a reward model trained by "
                              "`rlhf reward`")
        model = build_builtin(LlamaForSequenceClassification, name_or_path, num_labels=1)
        return _finish(expand_layers(_set_logprob_coef(model, logprob_coef, name_or_path), expand),
                       gradient_checkpointing, dtype)
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
    return _finish(expand_layers(_set_logprob_coef(model, logprob_coef, name_or_path), expand),
                   gradient_checkpointing)


LOGPROB_COEF = "reward_logprob_coef"  # config key: weight of the model's own log-likelihood in its score


def _set_logprob_coef(model, coef: float | None, name: str):
    if coef is not None:
        setattr(model.config, LOGPROB_COEF, float(coef))
    coef = getattr(model.config, LOGPROB_COEF, 0.0)
    # A sequence classifier keeps no lm_head of its own: the log-likelihood needs the LM head to be the input
    # embedding (tie_word_embeddings; true of the built-in models, Qwen2.5 0.5-3B, Llama 3.2 1B/3B, Gemma).
    if coef and not getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(f"`logprob_coef`: {name} has an LM head separate from its input embeddings "
                          f"(tie_word_embeddings false), which a reward model does not load; use logprob_coef 0")
    return model


def _innermost(model):
    """The model under DDP / DeepSpeed / torch.compile wrappers (the same parameters)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_lens: torch.Tensor) -> torch.Tensor:
    """Scores (N,) float32 of right-padded prompt + response rows (N, T): the score head at the last real token,
    plus `logprob_coef` x log p(response | prompt) (EOS included) under the model's own LM head, when its config
    sets one (`rlhf reward --logprob_coef`). prompt_lens (N,): the prompt's tokens in each row.

    Why the log-likelihood: the score head reads one hidden state, and whether the response's last token is the
    one the model predicts (the units digit of a sum, say) is the LM head's logit of that token at the position
    before it, a feature no fixed direction of a hidden state gives (results/rlhf_reward_model.md).
    """
    inner = _innermost(model)
    coef = float(getattr(inner.config, LOGPROB_COEF, 0.0) or 0.0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=coef > 0)
    score = out.logits[:, 0].float()  # (N,)
    if coef:
        # position t predicts token t + 1; only response positions go through the (tied) LM head
        pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)
        mask = (pos[None] >= prompt_lens.to(pos.device)[:, None]) & attention_mask[:, 1:].bool()  # (N, T-1)
        hidden = out.hidden_states[-1][:, :-1][mask]  # (M, d), after the final norm
        token_logp = logprobs_from_logits(hidden @ inner.get_input_embeddings().weight.T, input_ids[:, 1:][mask])
        rows = torch.arange(len(input_ids), device=pos.device)[:, None].expand_as(mask)[mask]  # (M,)
        score = score + coef * torch.zeros_like(score).index_add(0, rows, token_logp)
    return score
