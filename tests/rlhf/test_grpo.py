"""GRPO: loss types against hand numbers, gradient-accumulation invariance, learning, resume, LoRA reference."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf import grpo
from rlhf.runtime import ConfigError, make_config, read_jsonl

HERE = __file__


def digit_reward(prompts, completions, **kwargs):
    """Share of digits in the completion: something an untrained model can learn in a few steps."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def length_reward(prompts, completions, **kwargs):
    return [len(c) / 8 for c in completions]


def cfg_for(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), model_name_or_path="builtin:tiny", num_eval_prompts=0,
                per_device_train_batch_size=16, num_generations=4, max_completion_length=6, max_steps=2,
                learning_rate=1e-3, reward_funcs=[f"{HERE}:length_reward"], progress=False, report_to="none")
    base.update(kw)
    return make_config(grpo.Config, base)


# --------------------------------------------------------------------------------------------
# The loss on a toy batch, by hand
# --------------------------------------------------------------------------------------------

LOG2 = math.log(2.0)
K3_HALF = 0.5 - math.log(0.5) - 1  # k3 where pi_ref / pi = 1/2


def toy_batch():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    ref_logp = logp - torch.tensor([[LOG2, 0.0, 0.0], [0.0, LOG2, 0.0]])  # pi_ref / pi = 1/2 on two tokens
    return logp, {"mask": torch.tensor([[1, 1, 0], [1, 1, 1]]), "advantages": torch.tensor([1.0, -0.5]),
                  "old_logp": logp - 0.5, "ref_logp": ref_logp}


@pytest.mark.parametrize("loss_type, expected", [
    # per-token loss = -A + 0.1 * k3; row 0 tokens: (-1 + 0.1 K3, -1), row 1: (0.5, 0.5 + 0.1 K3, 0.5)
    ("grpo", ((-2 + 0.1 * K3_HALF) / 2 + (1.5 + 0.1 * K3_HALF) / 3) / 2),
    ("bnpo", (-2 + 1.5 + 0.2 * K3_HALF) / 5),
    ("dr_grpo", ((-2 + 0.1 * K3_HALF) / 4 + (1.5 + 0.1 * K3_HALF) / 4) / 2),
])
def test_loss_types_match_hand_numbers(tmp_path, loss_type, expected):
    cfg = cfg_for(tmp_path, loss_type=loss_type, beta=0.1, max_completion_length=4)
    logp, batch = toy_batch()
    loss, _ = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_clipping_with_stored_old_logprobs_matches_hand_numbers(tmp_path):
    # num_iterations > 1: ratio = exp(0.5) = 1.6487 on every token; A = 1 is clipped at 1 + 0.2,
    # A = -0.5 is not (the unclipped loss 0.5 * 1.6487 is the larger one).
    cfg = cfg_for(tmp_path, loss_type="bnpo", beta=0.0, num_iterations=2)
    logp, batch = toy_batch()
    loss, m = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    assert float(loss) == pytest.approx((2 * -1.2 + 3 * 0.5 * math.exp(0.5)) / 5, abs=1e-6)
    assert float(m["policy/clipfrac"]) == pytest.approx(2 / 5)
    cfg = cfg_for(tmp_path, loss_type="bnpo", beta=0.0, num_iterations=2, cliprange_high=0.28)
    loss, _ = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    assert float(loss) == pytest.approx((2 * -1.28 + 3 * 0.5 * math.exp(0.5)) / 5, abs=1e-6)


def test_micro_batch_shares_add_up_to_the_full_batch_loss(tmp_path):
    for loss_type in grpo.LOSS_MODES:
        cfg = cfg_for(tmp_path, loss_type=loss_type, beta=0.1, max_completion_length=4)
        logp, batch = toy_batch()
        full, _ = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
        parts = sum(grpo.micro_batch_loss(cfg, logp[i:i + 1], batch, slice(i, i + 1), num_seqs=2, num_tokens=5)[0]
                    for i in range(2))
        assert float(parts) == pytest.approx(float(full), abs=1e-6)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


class _SGD(torch.optim.SGD):
    """AdamW's first step is ~lr * sign(g), which turns fp noise on tiny gradients into lr-sized
    differences; plain SGD makes parameter differences proportional to gradient differences."""

    def __init__(self, params, lr, **adam_options):
        super().__init__(params, lr=lr)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, monkeypatch, loss_type):
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    common = dict(max_steps=1, loss_type=loss_type, beta=0.1, learning_rate=1.0)
    grpo.train(cfg_for(tmp_path, "one", per_device_train_batch_size=16, gradient_accumulation_steps=1, **common))
    grpo.train(cfg_for(tmp_path, "eight", per_device_train_batch_size=2, gradient_accumulation_steps=8, **common))
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "eight" / "model" / "model.safetensors")
    start = load_file(grpo_start_weights(tmp_path))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if k in start)
    assert moved > 1e-4  # the step did something
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5 * max(moved, 1.0), rtol=0), k
    la, lb = (read_jsonl(tmp_path / d / "metrics.jsonl")[0] for d in ("one", "eight"))
    assert la["loss/policy"] == pytest.approx(lb["loss/policy"], abs=1e-6)


def grpo_start_weights(tmp_path):
    from rlhf.models import save_builtin_tiny

    path = tmp_path / "start"
    if not path.exists():
        save_builtin_tiny(path)
    return path / "model.safetensors"


def test_first_step_has_ratio_one_and_zero_kl(tmp_path):
    # num_iterations = 2 uses the rollout's own log-probs as pi_old: the ratio is 1 only if
    # sampling and the training forward pass agree under left padding and temperature.
    torch.set_num_threads(1)
    grpo.train(cfg_for(tmp_path, max_steps=1, num_iterations=2, temperature=0.7, beta=0.1))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert abs(row["policy/ratio_mean"] - 1) < 1e-5 and row["policy/clipfrac"] == 0
    assert abs(row["kl/ref"]) < 1e-6


def test_first_step_has_ratio_one_on_a_model_with_dropout(tmp_path, dropout_model_dir):
    # GPT-2 with dropout 0.1: pi_old (the eval-mode sampler), the training pass and the reference agree
    torch.set_num_threads(1)
    grpo.train(cfg_for(tmp_path, model_name_or_path=str(dropout_model_dir), max_steps=1, num_iterations=2, beta=0.1))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert abs(row["policy/ratio_mean"] - 1) < 1e-5 and row["policy/clipfrac"] == 0
    assert abs(row["kl/ref"]) < 1e-6


@pytest.mark.slow
def test_reward_rises(tmp_path):
    torch.set_num_threads(1)
    summary = grpo.train(cfg_for(tmp_path, max_steps=12, per_device_train_batch_size=32, num_generations=8, beta=0.0,
                                 learning_rate=3e-3, reward_funcs=[f"{HERE}:digit_reward"]))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.08, (first, last)  # seeds 1-3 gain 0.18-0.25
    assert summary["step"] == 12


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    # num_iterations = 2 and a stop after step 1: the resumed run must reuse the stored batch.
    kw = dict(num_iterations=2, beta=0.1, learning_rate=1e-3)
    grpo.train(cfg_for(tmp_path, "straight", max_steps=3, **kw))
    grpo.train(cfg_for(tmp_path, "split", max_steps=1, **kw))
    grpo.train(cfg_for(tmp_path, "split", max_steps=3, resume_from_checkpoint="latest", **kw))
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def curve(d):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "completions/per_s"))}
                for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss/policy" in r]

    assert curve("straight") == curve("split") and len(curve("split")) == 3


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path, monkeypatch):
    calls = []
    real = grpo.load_causal_lm
    monkeypatch.setattr(grpo, "load_causal_lm", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = cfg_for(tmp_path, use_peft=True, lora_r=4, beta=0.1, max_steps=1, num_iterations=2)
    policy, reference = grpo.load_policy_and_reference(cfg)
    assert reference is None and len(calls) == 1  # no second copy
    calls.clear()
    grpo.train(cfg)
    assert len(calls) == 1
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert abs(row["kl/ref"]) < 1e-6  # LoRA starts at B = 0: policy == reference
    # the saved model is merged and loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")


def test_beta_zero_loads_no_reference(monkeypatch, tmp_path):
    calls = []
    real = grpo.load_causal_lm
    monkeypatch.setattr(grpo, "load_causal_lm", lambda *a, **k: calls.append(a) or real(*a, **k))
    _, reference = grpo.load_policy_and_reference(cfg_for(tmp_path, beta=0.0))
    assert reference is None and len(calls) == 1


def test_trl_clip_names_are_aliases_of_cliprange(tmp_path):
    """TRL's GRPOConfig calls the clip range epsilon / epsilon_high; ours is cliprange / cliprange_high, as in PPO."""
    from rlhf.runtime import parse_config

    assert cfg_for(tmp_path, epsilon=0.3, epsilon_high=0.28).cliprange == 0.3
    (tmp_path / "c.yaml").write_text("epsilon: 0.1\nepsilon_high: 0.4\n")
    cfg = parse_config(grpo.Config, ["--config", str(tmp_path / "c.yaml"), "--epsilon_high", "0.5"])
    assert (cfg.cliprange, cfg.cliprange_high) == (0.1, 0.5)
    assert parse_config(grpo.Config, ["--cliprange_high", "0.3"]).cliprange_high == 0.3
    (tmp_path / "both.yaml").write_text("epsilon: 0.1\ncliprange: 0.2\n")
    with pytest.raises(ConfigError, match="`epsilon` and `cliprange` are one option"):
        parse_config(grpo.Config, ["--config", str(tmp_path / "both.yaml")])


def test_bad_options_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="per_device_train_batch_size.*num_generations"):
        cfg_for(tmp_path, per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="reward_funcs.*nope"):
        grpo.train(cfg_for(tmp_path, reward_funcs=["nope"]))
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        grpo.train(cfg_for(tmp_path, resume_from_checkpoint="latest"))
    assert not (tmp_path / "run").exists()


def answer_column_reward(prompts, completions, answer, **kwargs):
    assert len(answer) == len(completions) and all(a.isdigit() for a in answer)
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_dataset_columns_reach_reward_functions(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo.train(cfg_for(tmp_path, dataset_name=str(data), max_steps=1, per_device_train_batch_size=8,
                       reward_funcs=[f"{HERE}:answer_column_reward"]))
    # without the `answer` column the function would raise (missing argument) and stop the run
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert "reward/answer_column_reward_mean" in row


def test_reward_function_errors_name_the_function_during_training(tmp_path):
    from rlhf.rewards import RewardError

    with pytest.raises(RewardError, match="`raising_reward` raised on batch 0"):
        grpo.train(cfg_for(tmp_path, max_steps=1, reward_funcs=[f"{HERE}:raising_reward"]))


def raising_reward(prompts, completions, **kwargs):
    raise ValueError("boom")


def issue_example_reward(prompts, completions, **kwargs):
    """Rewards [1, 1, NaN, 1 | 0, 1, 0, 1] for two groups of 4, whatever was sampled."""
    return [[1.0, 1.0, math.nan, 1.0, 0.0, 1.0, 0.0, 1.0][i % 8] for i in range(len(completions))]


def test_skipped_rewards_stay_out_of_group_statistics(tmp_path):
    from rlhf.distributed import make_accelerator
    from rlhf.rollout import PromptSource, load_rl_inputs

    torch.manual_seed(0)
    cfg = cfg_for(tmp_path, per_device_train_batch_size=8, num_generations=4, beta=0.0, skip_bad_rewards=True,
                  reward_funcs=[f"{HERE}:issue_example_reward"])
    accelerator = make_accelerator(1)
    rewards_fn, _, _, tokenizer, rows, _ = load_rl_inputs(cfg, accelerator.device)
    policy, reference = grpo.load_policy_and_reference(cfg)
    batch = grpo.make_batch(cfg, accelerator, policy, reference, tokenizer, PromptSource(rows[:2], 0), 2, rewards_fn,
                            None, 0)
    # group 0: the three valid completions have the same reward, so they teach nothing (was +0.5 each)
    assert batch["advantages"][:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert batch["advantages"][4:].tolist() == pytest.approx([-0.866, 0.866, -0.866, 0.866], abs=1e-3)
    assert batch["mask"][2].sum() == 0 and batch["mask"][[0, 1, 3]].sum(1).min() > 0
    m = batch["metrics"]
    assert m["frac_reward_zero_std"] == 0.5 and m["reward/mean"] == pytest.approx(5 / 7)
    assert m["reward/skipped"] == 1
