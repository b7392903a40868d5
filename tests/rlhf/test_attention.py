"""rlhf.models.attention: SDPA with keys padded to a multiple of 16 on CPU is the same attention, and it pads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf.models.attention import KEY_MULTIPLE, PADDED_SDPA, use_padded_sdpa
from rlhf.rollout import batch_logprobs, grouped_logprobs

PAD = 0


def lm(impl: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
                      eos_token_id=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    if impl == PADDED_SDPA:
        return use_padded_sdpa(model)
    model.set_attn_implementation(impl)
    return model


@pytest.fixture
def key_lengths(monkeypatch):
    """The key length of every torch SDPA call."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        seen.append(key.shape[2])
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("length", [5, 15, 16, 23])
@pytest.mark.parametrize("padding", [False, True])
def test_padded_sdpa_gives_transformers_sdpa_and_eager_values_and_gradients(length, padding, key_lengths):
    ids = torch.randint(3, 40, (3, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    if padding:  # left padding: an explicit mask; without it transformers runs SDPA's causal flag, no mask
        mask[1, :3] = 0
    outs = {}
    for impl in ("eager", "sdpa", PADDED_SDPA):
        model = lm(impl)
        key_lengths.clear()
        logits = model(input_ids=ids, attention_mask=mask).logits  # (3, L, V)
        (logits * mask[..., None]).square().sum().backward()
        outs[impl] = logits.detach(), [p.grad for p in model.parameters()]
        if impl == PADDED_SDPA:
            assert set(key_lengths) == {-(-length // KEY_MULTIPLE) * KEY_MULTIPLE}, key_lengths
    real = mask.bool()
    for impl in ("sdpa", PADDED_SDPA):
        assert torch.allclose(outs[impl][0][real], outs["eager"][0][real], atol=1e-5)
        for a, b in zip(outs[impl][1], outs["eager"][1]):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (impl, (a - b).abs().max())


def test_decoding_and_the_grouped_layout(key_lengths):
    """Decode steps (one query) keep their keys; DPO's shared-prefix rows (a 4D mask) give batch_logprobs' values."""
    padded, plain = lm(PADDED_SDPA), lm("sdpa")
    prompt = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0
    key_lengths.clear()
    a = padded.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=5, do_sample=False)
    assert key_lengths == [16, 16] + [n for n in range(7, 11) for _ in range(2)]  # prefill, then 4 steps (2 layers)
    assert torch.equal(a, plain.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=5,
                                         do_sample=False))
    # K = 3 completions per prompt, lengths 1 (EOS only) to 4; every row of the layout is 6 + 3 * 3 = 15 long
    completions = torch.randint(3, 40, (6, 4), generator=torch.Generator().manual_seed(2))
    completion_mask = torch.zeros_like(completions)
    for row, n in enumerate([1, 4, 2, 3, 1, 4]):
        completion_mask[row, :n] = 1
    key_lengths.clear()
    grouped = grouped_logprobs(padded, prompt, prompt_mask, completions, completion_mask)
    assert set(key_lengths) == {16}
    full = batch_logprobs(plain, torch.cat([prompt.repeat_interleave(3, 0), completions], 1),
                          torch.cat([prompt_mask.repeat_interleave(3, 0), completion_mask], 1), prompt.shape[1])
    m = completion_mask.bool()
    assert torch.allclose(grouped[m], full[m], atol=1e-5)
    # single-token completions: no completion column is a model input
    one = grouped_logprobs(padded, prompt, prompt_mask, completions[:, :1], completion_mask[:, :1])
    assert torch.allclose(one, full[:, :1], atol=1e-5)


def test_padded_models_save_as_plain_sdpa_models(tmp_path):
    model = lm(PADDED_SDPA)
    assert model.config._attn_implementation == PADDED_SDPA
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    eager = lm("eager")
    assert use_padded_sdpa(eager).config._attn_implementation == "eager"  # only SDPA models switch
