"""Built-in models: Llamas (transformers' `LlamaForCausalLM` from a config, fixed seed) with one character-level
tokenizer (a `tokenizers` WordLevel model over single characters, as a fast tokenizer).

- `builtin:tiny`, ~0.2M parameters: learns the built-in arithmetic task in a minute or two on a CPU.
- `builtin:small`, ~34M parameters (8 layers of width 512, heads of 64): a model whose cost is its matmuls, for
  measuring speed (`scripts/bench_bf16.py`); untrained, like tiny.

Nothing is downloaded; `save_builtin_tiny(d)` writes tiny in Hugging Face format, after which
`AutoTokenizer.from_pretrained(d)` / `AutoModelForCausalLM.from_pretrained(d)` load it with no project code.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf.distributed import transformers_zero3_off

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SMALL = "builtin:small"

# One token per printable ASCII character (+ newline) after the specials: ids are stable across runs.
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHARS = list(string.printable[:95]) + ["\n"]
# A minimal chat template: `<|role|>content\n` per message; an assistant turn ends with EOS instead of the newline.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Small enough to train on the arithmetic task in a minute or two on 2 CPU cores.
# 4 heads of 16. vLLM's CPU attention serves head_dim 32 and 64, not 16: `use_vllm` needs another model (the vLLM
# tests use this shape with head_dim=32). 2 heads of 32 learn the task far more slowly (SFT 8% instead of 66%).
_TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6)
# Width 512 with heads of 64 (a shape vLLM's CPU attention serves), tokenizer and positions as tiny's.
_SMALL = dict(_TINY, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8)
_SHAPES = {BUILTIN_TINY: _TINY, BUILTIN_SMALL: _SMALL}
BUILTIN_MODELS = tuple(_SHAPES)
_SEED = 1234


def tiny_tokenizer():
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=_CHAT_TEMPLATE,
                                   model_max_length=_TINY["max_position_embeddings"])


def builtin_config(name: str = BUILTIN_TINY):
    """The LlamaConfig of built-in model `name` (one of BUILTIN_MODELS)."""
    tok = tiny_tokenizer()
    return LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **_SHAPES[name])


def build_builtin(model_cls, name: str = BUILTIN_TINY, **overrides):
    """A freshly initialised built-in model; the same weights every call (fixed seed, caller's RNG untouched)."""
    config = builtin_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    # full weights even under a ZeRO-3 launch: the sequence-classification constructor builds its
    # body through from_config, which would otherwise shard it mid-construction and break init
    with torch.random.fork_rng(devices=[]), transformers_zero3_off():
        torch.manual_seed(_SEED)
        return model_cls(config)


def builtin_causal_lm(name: str = BUILTIN_TINY):
    model = build_builtin(LlamaForCausalLM, name)
    cfg = model.config
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id, do_sample=False)
    return model


def save_builtin_tiny(out_dir: str | os.PathLike) -> Path:
    """Write the untrained tiny model and its tokenizer in Hugging Face format (safetensors)."""
    out_dir = Path(out_dir)
    builtin_causal_lm().save_pretrained(out_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
