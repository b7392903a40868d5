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
    ("dapo", (-2 + 1.5 + 0.2 * K3_HALF) / 5),  # the same global token mean under TRL's name
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


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimator_and_kl_in_reward_in_the_loss(tmp_path, kl_estimator):
    from rlhf.core import kl_estimate

    logp, batch = toy_batch()
    cfg = cfg_for(tmp_path, loss_type="bnpo", beta=0.1, kl_estimator=kl_estimator)
    loss, _ = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    kl = kl_estimate(logp, batch["ref_logp"], kl_estimator)
    pg = (-2 + 1.5) / 5  # -A per token, ratio 1
    assert float(loss) == pytest.approx(pg + 0.1 * float((kl * batch["mask"]).sum()) / 5, abs=1e-6)
    # kl_in_reward: the KL is already in the advantages, so the loss has no KL term
    cfg = cfg_for(tmp_path, loss_type="bnpo", beta=0.1, kl_in_reward=True)
    loss, _ = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    assert float(loss) == pytest.approx(pg, abs=1e-6)


def test_entropy_bonus_is_subtracted_from_the_loss(tmp_path):
    logp, batch = toy_batch()
    entropy = torch.tensor([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5]])  # the 9 is padding
    cfg = cfg_for(tmp_path, loss_type="grpo", beta=0.0, entropy_coef=0.01)
    loss, m = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5, entropy=entropy)
    pg = ((-2) / 2 + 1.5 / 3) / 2
    assert float(loss) == pytest.approx(pg - 0.01 * (1.5 + 0.5) / 2, abs=1e-6)
    assert float(m["entropy_sum"]) == pytest.approx(4.5)


def test_gspo_sequence_ratio_clips_whole_completions(tmp_path):
    # num_iterations > 1, old = logp - 0.5 on every token: the sequence ratio is exp(0.5) for both rows, as the
    # token ratio; shift one token of row 1 so that only the sequence level averages it out
    logp, batch = toy_batch()
    batch["old_logp"] = batch["old_logp"].clone()
    batch["old_logp"][1, 0] += 0.9  # token ratio exp(-0.4) there; row 1's sequence ratio exp(0.2)
    cfg = cfg_for(tmp_path, loss_type="grpo", beta=0.0, num_iterations=2, importance_sampling_level="sequence")
    loss, m = grpo.micro_batch_loss(cfg, logp, batch, slice(0, 2), num_seqs=2, num_tokens=5)
    # row 0: A = 1, s = exp(0.5) clipped to 1.2; row 1: A = -0.5, s = exp(0.2) (inside the range, unclipped)
    assert float(loss) == pytest.approx((-1.2 + 0.5 * math.exp(0.2)) / 2, abs=1e-6)
    assert float(m["policy/clipfrac"]) == pytest.approx(2 / 5)  # the two tokens of row 0


def prompt_gated_reward(prompts, completions, **kwargs):
    """The length reward on prompts that start with an odd digit; a constant (a group that teaches nothing) else."""
    return [len(c) / 8 if int(p[0]) % 2 else 1.0 for p, c in zip(prompts, completions)]


def batch_for(tmp_path, rows_from=0, **kw):
    from rlhf.distributed import make_accelerator
    from rlhf.rollout import PromptSource, load_rl_inputs

    cfg = cfg_for(tmp_path, **kw)
    accelerator = make_accelerator(1)
    rewards_fn, _, _, tokenizer, rows, _ = load_rl_inputs(cfg, accelerator.device)
    policy, reference = grpo.load_policy_and_reference(cfg)
    n_prompts = cfg.per_device_train_batch_size // cfg.num_generations
    torch.manual_seed(0)
    batch = grpo.make_batch(cfg, accelerator, policy, reference, tokenizer, PromptSource(rows, cfg.seed), n_prompts,
                            rewards_fn, None, 0)
    return cfg, batch, policy, tokenizer


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ(tmp_path):
    gated = [f"{HERE}:prompt_gated_reward"]
    cfg, batch, _, _ = batch_for(tmp_path, reward_funcs=gated, dynamic_sampling=True, max_sampling_rounds=8,
                                 beta=0.0)
    m = batch["metrics"]
    assert m["sampling/rounds"] >= 2 and m["sampling/dropped_groups"] > 0 and m["sampling/filler_groups"] == 0
    adv = batch["advantages"].view(-1, cfg.num_generations)
    assert (adv.abs().sum(1) > 0).all()  # every kept group teaches something
    assert batch["fillers"] == 0 and batch["mask"].sum(1).min() > 0
    # the bound: one round only, so the constant groups stay, masked out and not counted
    cfg, batch, _, _ = batch_for(tmp_path, reward_funcs=gated, dynamic_sampling=True, max_sampling_rounds=1,
                                 beta=0.0)
    m, G = batch["metrics"], cfg.num_generations
    assert m["sampling/rounds"] == 1 and m["sampling/filler_groups"] > 0
    assert batch["fillers"] == m["sampling/filler_groups"] * G
    filler_rows = batch["mask"].sum(1) == 0
    assert int(filler_rows.sum()) == batch["fillers"] and batch["advantages"][filler_rows].abs().sum() == 0


def test_remax_baseline_is_the_greedy_completions_reward(tmp_path):
    from rlhf.rollout import decode_completions, generate

    cfg, batch, policy, tokenizer = batch_for(tmp_path, advantage_estimator="remax", beta=0.0)
    G = cfg.num_generations
    prompt_ids = batch["input_ids"][::G, :batch["start"]]
    prompt_mask = batch["attention_mask"][::G, :batch["start"]]
    greedy = generate(policy, prompt_ids, prompt_mask, cfg.max_completion_length, tokenizer.eos_token_id,
                      tokenizer.pad_token_id, greedy=True)
    baseline = torch.tensor(length_reward(None, decode_completions(tokenizer, greedy)))  # (prompts,)
    completions = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in
                   zip(batch["input_ids"][:, batch["start"]:], batch["mask"])]
    rewards = torch.tensor(length_reward(None, completions))
    assert batch["advantages"].tolist() == pytest.approx((rewards - baseline.repeat_interleave(G)).tolist(), abs=1e-6)
    assert batch["metrics"]["reward/baseline_mean"] == pytest.approx(float(baseline.mean()))


def test_overlong_penalty_enters_the_reward(tmp_path):
    # every completion of the untrained model runs to max_completion_length (6): the ramp's end, -penalty
    _, plain, _, _ = batch_for(tmp_path, beta=0.0)
    _, punished, _, _ = batch_for(tmp_path, beta=0.0, overlong_buffer_len=2, overlong_penalty=0.5)
    lengths = plain["mask"].sum(1).float()
    shift = 0.5 * ((6 - 2 - lengths) / 2).clamp(-1, 0)
    assert punished["metrics"]["reward/mean"] == pytest.approx(plain["metrics"]["reward/mean"]
                                                               + float(shift.mean()), abs=1e-6)


def test_variant_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="advantage_estimator.*kl_in_reward"):
        cfg_for(tmp_path, advantage_estimator="reinforce_pp", beta=0.1)
    cfg_for(tmp_path, advantage_estimator="reinforce_pp", beta=0.1, kl_in_reward=True)
    with pytest.raises(ConfigError, match="overlong_buffer_len"):
        cfg_for(tmp_path, overlong_buffer_len=7)
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        cfg_for(tmp_path, importance_sampling_level="group")
    with pytest.raises(ConfigError, match="kl_estimator"):
        cfg_for(tmp_path, kl_estimator="k4")
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        cfg_for(tmp_path, max_sampling_rounds=0)
    with pytest.raises(ConfigError, match="scale_rewards.*grpo only"):
        cfg_for(tmp_path, advantage_estimator="rloo", scale_rewards="none")


def test_rollouts_of_different_widths_concatenate_without_changing_log_probs(tmp_path, tiny_tokenizer):
    # dynamic sampling joins rounds whose prompts and completions have different widths
    from rlhf.models import load_causal_lm
    from rlhf.rollout import batch_logprobs, cat_rollouts, generate, tokenize_prompts

    torch.manual_seed(0)
    model = load_causal_lm("builtin:tiny")
    parts = []
    for prompts, n in ((["1+2=", "12+345="], 3), (["123+4567+89="], 6)):
        ids, mask = tokenize_prompts(tiny_tokenizer, prompts)
        parts.append(generate(model, ids, mask, n, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id))
    joined = cat_rollouts(parts, tiny_tokenizer.pad_token_id)
    assert joined.prompt_ids.shape[1] == max(p.prompt_ids.shape[1] for p in parts)
    with torch.no_grad():
        together = batch_logprobs(model, joined.input_ids, joined.attention_mask, joined.prompt_ids.shape[1])
        alone = [batch_logprobs(model, p.input_ids, p.attention_mask, p.prompt_ids.shape[1]) for p in parts]
    rows = 0
    for p, lp in zip(parts, alone):
        T = lp.shape[1]
        m = p.completion_mask.bool()
        torch.testing.assert_close(together[rows:rows + len(lp), :T][m], lp[m], atol=1e-5, rtol=0)
        torch.testing.assert_close(joined.logprobs[rows:rows + len(lp), :T][m], p.logprobs[m])
        assert joined.completion_mask[rows:rows + len(lp), T:].sum() == 0
        rows += len(lp)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


class _SGD(torch.optim.SGD):
    """AdamW's first step is ~lr * sign(g), which turns fp noise on tiny gradients into lr-sized
    differences; plain SGD makes parameter differences proportional to gradient differences."""

    def __init__(self, params, lr, **adam_options):
        super().__init__(params, lr=lr)


# every variant (the option values that change the step's arithmetic) must keep the 1x8 == 8x1 invariance
VARIANTS = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "gspo": dict(importance_sampling_level="sequence", num_iterations=2),
    "rloo": dict(advantage_estimator="rloo"),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", kl_in_reward=True),
    "remax": dict(advantage_estimator="remax"),
    "k1_in_reward": dict(kl_in_reward=True),
    "k2_entropy": dict(kl_estimator="k2", entropy_coef=0.05),
    "dynamic_sampling": dict(dynamic_sampling=True, max_sampling_rounds=2, overlong_buffer_len=2,
                             reward_funcs=[f"{HERE}:prompt_gated_reward"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, monkeypatch, variant):
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    common = dict(max_steps=1, beta=0.1, learning_rate=1.0, **VARIANTS[variant])
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
@pytest.mark.parametrize("variant", ["grpo", "dynamic_sampling", "remax", "reinforce_pp"])
def test_resume_continues_exactly(tmp_path, variant):
    torch.set_num_threads(1)
    # num_iterations = 2 and a stop after step 1: the resumed run must reuse the stored batch; dynamic
    # sampling must also continue from the prompt position its extra rounds reached
    kw = dict(VARIANTS[variant], beta=0.1, learning_rate=1e-3)
    kw["num_iterations"] = 2
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
