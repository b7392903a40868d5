"""bf16 (`--bf16 true`): autocast runs on CPU (frozen models too), an SFT run learns the built-in task, the losses of
SFT, reward and GRPO on one fixed batch stay within a stated tolerance of float32, a resumed bf16 run continues
exactly, a CPU without bfloat16 instructions gets a warning, and a second stage in another precision in one process
is a clear error.

Tolerance, on the briefly trained SFT fixture model: each loss within 2% of its float32 value and its gradient at a
cosine of at least 0.99 to float32's. Measured here: SFT 0.01%, reward (ranking loss) 0.12%, GRPO (clipped ratios
and a KL term) 0.32%; cosines >= 0.9986 (bfloat16 keeps 8 bits of mantissa, ~0.4% per rounding).
"""

import logging

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from rlhf import grpo, reward, sft
from rlhf.core import ranking_loss
from rlhf.data import collate_rankings, collate_sft, tokenize_rankings, tokenize_sft
from rlhf.distributed import make_accelerator, prepare_frozen
from rlhf.models import BUILTIN_TINY, load_causal_lm, load_reward_model
from rlhf.rollout import batch_logprobs
from rlhf.runtime import ConfigError, make_config, read_jsonl
from rlhf.tasks import arithmetic

torch.set_num_threads(1)

LOSS_RTOL, GRAD_COS = 0.02, 0.99


def _reset():
    """accelerate fixes mixed precision per process state: forget it."""
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_state():
    _reset()
    yield
    _reset()


def _fp32_and_bf16(model, loss_fn):
    """(loss, flat gradient) of `loss_fn(model)` in float32 and under the bf16 accelerator's autocast."""
    accelerator = make_accelerator(bf16=True)
    out = []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with accelerator.autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = loss_fn(model)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out.append((float(loss.detach()), grad))
    return out


def _assert_close(pair, what):
    (loss32, grad32), (loss16, grad16) = pair
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (what, loss32, loss16)
    cos = float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0))
    assert cos >= GRAD_COS, (what, cos)


def test_sft_loss_on_a_fixed_batch_is_within_tolerance_of_fp32(fresh_state, sft_model_dir, tiny_tokenizer):
    rows = datasets.Dataset.from_list(arithmetic.make_sft_rows(32, seed=5))
    batch = collate_sft(tokenize_sft(rows, tiny_tokenizer, 64).examples, tiny_tokenizer.pad_token_id)
    model = load_causal_lm(str(sft_model_dir))
    seen = []

    def loss(m):
        per_token, mask = sft.token_losses(m, batch)
        seen.append(m(input_ids=batch["input_ids"][:1]).logits.dtype)  # what the forward pass ran in
        return (per_token * mask).sum() / mask.sum()

    _assert_close(_fp32_and_bf16(model, loss), "sft")
    assert seen == [torch.float32, torch.bfloat16]


def test_reward_loss_on_a_fixed_batch_is_within_tolerance_of_fp32(fresh_state, sft_model_dir, tiny_tokenizer):
    rows = arithmetic.make_ranking_rows(arithmetic.make_prompts(16, seed=3), 4, seed=3)
    groups = tokenize_rankings(datasets.Dataset.from_list(rows), tiny_tokenizer, 64).examples
    batch = collate_rankings(groups, tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = load_reward_model(str(sft_model_dir))
    with torch.no_grad():  # scores of a few units, as a trained reward model gives, not the new head's ~0
        model.score.weight.normal_(0.0, 0.3)
    _assert_close(_fp32_and_bf16(model, lambda m: ranking_loss(reward.group_scores(m, batch), batch["ranks"])[0]),
                  "reward")


def test_grpo_loss_on_a_fixed_batch_is_within_tolerance_of_fp32(fresh_state, sft_model_dir, tiny_tokenizer):
    cfg = make_config(grpo.Config, dict(output_dir="unused", num_iterations=2, beta=0.04, max_completion_length=6))
    prompts = arithmetic.make_prompts(16, seed=4)
    model = load_causal_lm(str(sft_model_dir))
    pad = tiny_tokenizer.pad_token_id
    prompt_ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [tiny_tokenizer(arithmetic.gold_answer(p), add_special_tokens=False)["input_ids"]
                      + [tiny_tokenizer.eos_token_id] for p in prompts]
    start, T = max(map(len, prompt_ids)), max(map(len, completion_ids))
    # the rollout's layout: prompts left-padded to one width, completions right-padded
    input_ids = torch.tensor([[pad] * (start - len(p)) + p + c + [pad] * (T - len(c))
                              for p, c in zip(prompt_ids, completion_ids)])  # (B, P + T)
    attention_mask = torch.tensor([[0] * (start - len(p)) + [1] * (len(p) + len(c)) + [0] * (T - len(c))
                                   for p, c in zip(prompt_ids, completion_ids)])
    completion_mask = attention_mask[:, start:]
    with torch.no_grad():
        logp32 = batch_logprobs(model, input_ids, attention_mask, start, cfg.temperature)
    g = torch.Generator().manual_seed(0)
    # pi_old and pi_ref a little away from pi (fixed constants for both precisions): ratios != 1, some clipped
    batch = {"mask": completion_mask, "advantages": torch.randn(len(prompts), generator=g),
             "old_logp": logp32 + 0.15 * torch.randn(logp32.shape, generator=g),
             "ref_logp": logp32 + 0.3 * torch.randn(logp32.shape, generator=g)}
    n_tokens = completion_mask.sum()

    def loss(m):
        logp = batch_logprobs(m, input_ids, attention_mask, start, cfg.temperature)
        return grpo.micro_batch_loss(cfg, logp, batch, slice(None), len(prompts), n_tokens)[0]

    _assert_close(_fp32_and_bf16(model, loss), "grpo")


QUICK = dict(per_device_train_batch_size=32, learning_rate=3e-3, num_train_examples=2000, num_eval_prompts=0,
             num_eval_examples=200, eval_pass_at_k=0, progress=False, report_to="none", bf16=True)


def test_bf16_sft_learns_the_builtin_task_as_fp32_does(fresh_state, tmp_path):
    # 60 steps: held-out loss from ln(100) = 4.6 to 1.58-1.61 in bf16 on seeds 0-2, float32 within 0.011 of it
    runs = {}
    for bf16 in (True, False):
        _reset()
        cfg = make_config(sft.Config, {**QUICK, "output_dir": str(tmp_path / str(bf16)), "max_steps": 60,
                                       "bf16": bf16})
        runs[bf16] = sft.train(cfg)["eval/loss"]
    assert runs[True] < 2.0, runs
    assert abs(runs[True] - runs[False]) < 0.1, runs


def test_bf16_resume_continues_exactly(fresh_state, tmp_path):
    run = tmp_path / "run"
    kw = {**QUICK, "output_dir": str(run), "num_eval_examples": 0, "per_device_train_batch_size": 8, "max_steps": 4,
          "save_steps": 2, "warmup_ratio": 0.25}
    sft.train(make_config(sft.Config, kw))
    straight = load_file(run / "model" / "model.safetensors")
    straight_rows = read_jsonl(run / "metrics.jsonl")
    (run / "summary.json").unlink()
    _reset()
    sft.train(make_config(sft.Config, {**kw, "resume_from_checkpoint": str(run / "checkpoints" / "step-00000002")}))
    resumed = load_file(run / "model" / "model.safetensors")
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in straight_rows]
    for a, b in zip(straight_rows, rows):
        assert a.get("loss/sft") == b.get("loss/sft") and a.get("train/lr") == b.get("train/lr")
    for k in straight:  # float32 master weights, saved and restored as they are
        assert straight[k].dtype == torch.float32 and torch.equal(straight[k], resumed[k]), k


def test_frozen_models_run_in_the_stages_precision(fresh_state, tiny_tokenizer):
    # the reference and a reward model (prepare_frozen): bf16 under --bf16 true, as the policy's forward
    model = prepare_frozen(make_accelerator(bf16=True), load_reward_model(BUILTIN_TINY))
    batch = tiny_tokenizer(["1+2=3"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.dtype == torch.bfloat16


def test_a_cpu_without_bf16_instructions_warns(fresh_state, monkeypatch, caplog):
    import rlhf.distributed as distributed

    monkeypatch.setattr(distributed, "cpu_bf16_instructions", lambda: None)
    with caplog.at_level(logging.WARNING, logger="rlhf.distributed"):
        make_accelerator(bf16=True)
    assert "no bfloat16 instructions" in caplog.text and "--bf16 false" in caplog.text


def test_a_second_stage_in_another_precision_is_a_clear_error(fresh_state):
    make_accelerator(bf16=True)
    with pytest.raises(ConfigError, match="`bf16`: this process already runs in mixed precision 'bf16'"):
        make_accelerator(bf16=False)
