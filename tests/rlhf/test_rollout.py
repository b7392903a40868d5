"""Rollout: sampling with a KV cache agrees with the training forward pass (ratio 1 at the first step)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.core import kl_estimate, ppo_clip_loss
from rlhf.rollout import PromptSource, batch_logprobs, filter_logits, generate, position_ids_from_mask

PAD, BOS, EOS = 0, 1, 2


def tiny_lm(seed=0, vocab=40):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(cfg).eval()


def left_padded(lengths, width, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : width - n] = PAD
        mask[i, : width - n] = 0
    return ids, mask


def test_sampled_logprobs_equal_training_logprobs_with_mixed_prompt_lengths():
    torch.set_num_threads(1)
    model = tiny_lm()
    ids, mask = left_padded([9, 2, 5, 1, 7, 3, 9, 4], width=9)
    for temperature in (1.0, 0.7):
        torch.manual_seed(1)
        r = generate(model, ids, mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature)
        lp = batch_logprobs(model, r.input_ids, r.attention_mask, ids.shape[1], temperature).detach()
        m = r.completion_mask.bool()
        assert torch.allclose(lp[m], r.logprobs[m], atol=2e-5), (lp - r.logprobs)[m].abs().max()
        # the step-0 quantities PPO/GRPO see: ratio 1, no clipping, KL to an identical reference 0
        _, metrics = ppo_clip_loss(lp, r.logprobs, torch.ones(len(ids)), r.completion_mask)
        assert abs(float(metrics["policy/ratio_mean"]) - 1) < 1e-5 and float(metrics["policy/clipfrac"]) == 0
        assert float(kl_estimate(lp, r.logprobs, "k3")[m].abs().max()) < 1e-8


def test_left_padding_does_not_change_logprobs():
    # The same prompt alone and left-padded in a batch gets the same completion log-probs.
    model = tiny_lm()
    ids, mask = left_padded([3, 8], width=8, seed=3)
    completion = torch.randint(3, 40, (2, 5))
    full = torch.cat([ids, completion], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    batched = batch_logprobs(model, full, full_mask, 8)
    alone = batch_logprobs(model, full[:1, 5:], full_mask[:1, 5:], 3)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert position_ids_from_mask(mask)[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2]


def test_stops_at_eos_and_mask_includes_eos():
    model = tiny_lm()
    with torch.no_grad():  # make EOS likely so some rows stop early and others do not
        model.lm_head.weight[EOS] += 0.5 * model.model.embed_tokens.weight.std()
    ids, mask = left_padded([4, 6, 2, 5] * 4, width=6)
    torch.manual_seed(0)
    r = generate(model, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    for row, m, truncated in zip(r.completion_ids, r.completion_mask, r.is_truncated):
        eos_at = (row == EOS).nonzero()
        if truncated:
            assert len(eos_at) == 0 and m.sum() == r.completion_ids.shape[1]
        else:
            first = int(eos_at[0])
            assert m[: first + 1].all() and not m[first + 1:].any()  # up to and including EOS
            assert (row[first + 1:] == PAD).all()
    assert r.is_truncated.any() or r.completion_ids.shape[1] < 10  # the loop stops once every row is done
    assert (~r.is_truncated).any()
    assert (r.logprobs[r.completion_mask == 0] == 0).all()


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    model = tiny_lm()
    ids, mask = left_padded([3, 5], width=5)
    greedy = generate(model, ids, mask, 6, EOS, PAD, greedy=True)
    top1 = generate(model, ids, mask, 6, EOS, PAD, top_k=1)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, top_k=3)).sum() == 3


def test_prompt_source_resumes_exactly():
    rows = [{"prompt": str(i)} for i in range(7)]
    a = PromptSource(rows, seed=3)
    first = a.take(5) + a.take(6)
    b = PromptSource(rows, seed=3, position=5)
    assert b.take(6) == first[5:]
    assert sorted(r["prompt"] for r in first[:7]) == [str(i) for i in range(7)]  # an epoch is a permutation


def test_shared_prompt_prefill_for_groups_matches_training_logprobs():
    model = tiny_lm()
    ids, mask = left_padded([6, 2, 4], width=6)
    torch.manual_seed(2)
    r = generate(model, ids, mask, max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=4)
    assert r.completion_ids.shape[0] == 12 and torch.equal(r.prompt_ids, ids.repeat_interleave(4, 0))
    lp = batch_logprobs(model, r.input_ids, r.attention_mask, ids.shape[1]).detach()
    m = r.completion_mask.bool()
    assert torch.allclose(lp[m], r.logprobs[m], atol=2e-5)
    assert len({tuple(row.tolist()) for row in r.completion_ids[:4]}) > 1  # the G samples of a prompt differ


def test_shared_prompt_training_pass_matches_the_plain_pass_values_and_gradients():
    model = tiny_lm().train()
    ids, mask = left_padded([6, 2, 4], width=6)
    torch.manual_seed(3)
    r = generate(model, ids, mask, max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=4)
    params = list(model.parameters())
    # rows 3..9: a micro-batch that starts and ends inside a group, as accumulation slices can
    for sl in (slice(0, 12), slice(3, 10)):
        x, am, m = r.input_ids[sl], r.attention_mask[sl], r.completion_mask[sl]
        plain = batch_logprobs(model, x, am, ids.shape[1], temperature=0.7)
        shared = batch_logprobs(model, x, am, ids.shape[1], temperature=0.7, share_prompts=True)
        assert torch.allclose(plain * m, shared * m, atol=1e-5), (plain - shared).mul(m).abs().max()
        g_plain = torch.autograd.grad((plain * m).sum(), params)
        g_shared = torch.autograd.grad((shared * m).sum(), params)
        for a, b in zip(g_plain, g_shared):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    # distinct prompts (PPO's batches) also pass through unchanged
    one_each = r.input_ids[::4], r.attention_mask[::4]
    assert torch.allclose(batch_logprobs(model, *one_each, ids.shape[1]),
                          batch_logprobs(model, *one_each, ids.shape[1], share_prompts=True), atol=1e-5)


def test_max_prompt_length_keeps_the_end_of_plain_and_chat_prompts():
    from rlhf.models import load_tokenizer
    from rlhf.rollout import tokenize_prompts

    tok = load_tokenizer("builtin:tiny", padding_side="right")  # the padding side the caller left must not matter
    decode = lambda ids: tok.decode(ids)  # noqa: E731 - keeps special tokens
    # character-level with a BOS: 11 tokens; 6 keep BOS and the last 5 (right truncation gave "<s>1234+")
    ids, mask = tokenize_prompts(tok, ["1234+5678=", "1+1="], max_prompt_length=6)
    assert [decode(r) for r in ids] == ["<s>5678=", "<pad><s>1+1="]
    assert mask.tolist() == [[1] * 6, [0] + [1] * 5]
    chat = [{"role": "user", "content": "1234+5678="}]
    ids, _ = tokenize_prompts(tok, [chat], max_prompt_length=20)
    assert decode(ids[0]) == "<s>5678=\n<|assistant|>"  # the generation prompt survives
    # no limit: the tokenizer's own left-padded batch encoding
    tok.padding_side = "left"
    ids, mask = tokenize_prompts(tok, ["1234+5678=", "1+1="])
    enc = tok(["1234+5678=", "1+1="], padding=True, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
