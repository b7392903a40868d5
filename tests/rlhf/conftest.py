"""Shared fixtures for the rlhf tests: the tiny tokenizer, a saved tiny model, a briefly trained SFT model.

Kept cheap: the SFT fixture trains the builtin tiny model for a few dozen steps once per session.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf.models import BUILTIN_TINY, load_tokenizer

    return load_tokenizer(BUILTIN_TINY)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The untrained builtin tiny model + tokenizer saved in Hugging Face format."""
    from rlhf.models import save_builtin_tiny

    return save_builtin_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    """A tiny model fine-tuned for 60 SFT steps on the arithmetic task (answers are mostly well-formed)."""
    from rlhf import sft
    from rlhf.runtime import make_config

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sft_fixture")
    cfg = make_config(sft.Config, dict(output_dir=str(out), max_steps=60, per_device_train_batch_size=32,
                                       learning_rate=3e-3, num_train_examples=2000, num_eval_prompts=64,
                                       eval_steps=0, progress=False, report_to="none"))
    sft.train(cfg)
    return out / "model"


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory):
    """A small GPT-2-architecture model with dropout 0.1 everywhere (its defaults) and the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.models import BUILTIN_TINY, load_tokenizer

    tok = load_tokenizer(BUILTIN_TINY)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2_dropout") / "model"
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
