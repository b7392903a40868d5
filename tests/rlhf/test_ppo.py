"""PPO: value head initialisation, ratio 1 / KL 0 at the start, gradient-accumulation
invariance, learning, and an exact resume with an adaptive KL controller."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf import ppo
from rlhf.runtime import ConfigError, make_config, read_jsonl

HERE = __file__


def digit_reward(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def length_reward(prompts, completions, **kwargs):
    return [len(c) / 8 for c in completions]


def cfg_for(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), model_name_or_path="builtin:tiny", num_eval_prompts=0,
                per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2, max_completion_length=6,
                max_steps=2, learning_rate=1e-3, reward_funcs=[f"{HERE}:length_reward"], progress=False,
                report_to="none")
    base.update(kw)
    return make_config(ppo.Config, base)


def test_value_head_from_a_reward_model_starts_at_its_scores(tmp_path):
    from rlhf.models import load_reward_model

    torch.manual_seed(0)
    rm = load_reward_model("builtin:tiny").eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    rm.save_pretrained(tmp_path / "rm")
    value = ppo.load_value_model(str(tmp_path / "rm")).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        per_token = value(input_ids=ids).logits[..., 0]  # (B, L)
        score = rm(input_ids=ids).logits[:, 0]  # (B,) at the last token
    assert torch.allclose(per_token[:, -1], score, atol=1e-5)


def test_first_update_sees_ratio_one_and_zero_kl(tmp_path):
    torch.set_num_threads(1)
    ppo.train(cfg_for(tmp_path, max_steps=1, num_ppo_epochs=1, num_mini_batches=1, temperature=0.7))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["kl/ref"] == 0.0  # policy == reference before any update
    assert row["policy/clipfrac"] == 0.0 and abs(row["policy/approx_kl"]) < 1e-7


def test_first_update_has_ratio_one_on_a_model_with_dropout(tmp_path, dropout_model_dir):
    # GPT-2 with dropout 0.1: old log-probs / values and the update's pass must be the same function
    torch.set_num_threads(1)
    ppo.train(cfg_for(tmp_path, model_name_or_path=str(dropout_model_dir), max_steps=1, num_ppo_epochs=1,
                      num_mini_batches=1, num_eval_prompts=0))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["kl/ref"] == 0.0 and row["policy/clipfrac"] == 0.0 and abs(row["policy/approx_kl"]) < 1e-7
    assert row["value/clipfrac"] == 0.0


def test_rollout_batch_size_changes_only_the_rounding(tmp_path, monkeypatch):
    """Scoring a rollout in other chunks (the whole batch; uneven chunks of 3) trains the same model."""
    torch.set_num_threads(1)
    rows_per_call, batch_logprobs = [], ppo.batch_logprobs

    def counted(model, input_ids, *args, **kwargs):
        rows_per_call.append(len(input_ids))
        return batch_logprobs(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(ppo, "batch_logprobs", counted)
    runs = {size: cfg_for(tmp_path, f"rollout{size}", rollout_batch_size=size) for size in (0, 16, 3)}
    for size, cfg in runs.items():
        rows_per_call.clear()
        ppo.train(cfg)
        # 16 completions per step: reference passes in chunks of 8 (the micro-batch), 16, or 3 x 5 + 1
        assert set(rows_per_call) == {0: {8}, 16: {8, 16}, 3: {8, 3, 1}}[size], size
    rows = {size: read_jsonl(tmp_path / f"rollout{size}" / "metrics.jsonl") for size in runs}
    weights = {size: load_file(tmp_path / f"rollout{size}" / "model" / "model.safetensors") for size in runs}
    for size in (16, 3):
        for a, b in zip(rows[0], rows[size]):
            for key in ("kl/ref", "loss/policy", "loss/value", "reward/score_mean", "policy/clipfrac"):
                assert b[key] == pytest.approx(a[key], abs=1e-5), (size, key)
        for k in weights[0]:
            assert torch.allclose(weights[0][k], weights[size][k], atol=1e-5), (size, k)


def test_rollout_batch_size_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        cfg_for(tmp_path, rollout_batch_size=-1)


class _SGD(torch.optim.SGD):
    def __init__(self, params, lr, **adam_options):
        super().__init__(params, lr=lr)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, monkeypatch, entropy_coef):
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    common = dict(max_steps=1, num_ppo_epochs=1, num_mini_batches=1, learning_rate=0.5, entropy_coef=entropy_coef)
    ppo.train(cfg_for(tmp_path, "one", per_device_train_batch_size=16, gradient_accumulation_steps=1, **common))
    ppo.train(cfg_for(tmp_path, "eight", per_device_train_batch_size=2, gradient_accumulation_steps=8, **common))
    for part in ("model", "value_model"):
        a = load_file(tmp_path / "one" / part / "model.safetensors")
        b = load_file(tmp_path / "eight" / part / "model.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (part, k)
    la, lb = (read_jsonl(tmp_path / d / "metrics.jsonl")[0] for d in ("one", "eight"))
    assert la["loss/policy"] == pytest.approx(lb["loss/policy"], abs=1e-6)
    assert la["loss/value"] == pytest.approx(lb["loss/value"], abs=1e-6)
    if entropy_coef:
        assert la["policy/entropy"] == pytest.approx(lb["policy/entropy"], abs=1e-5) and la["policy/entropy"] > 0


def test_entropy_bonus_is_subtracted_from_the_loss(tmp_path):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.zeros(2, 3)
    batch = {"mask": mask, "old_logp": logp, "advantages": torch.zeros(2, 3), "old_values": torch.zeros(2, 3),
             "returns": torch.zeros(2, 3)}
    entropy = torch.tensor([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5]])  # the 9 is padding
    idx = torch.arange(2)
    plain, _ = ppo.micro_batch_loss(cfg_for(tmp_path), logp, torch.zeros(2, 3), batch, idx, 5)
    loss, m = ppo.micro_batch_loss(cfg_for(tmp_path, entropy_coef=0.1), logp, torch.zeros(2, 3), batch, idx, 5,
                                   entropy)
    assert float(loss - plain) == pytest.approx(-0.1 * 4.5 / 5) and float(m["policy/entropy"]) == pytest.approx(0.9)


def prompt_only_reward(prompts, completions, **kwargs):
    return [float(len(p)) for p in prompts]


def test_greedy_baseline_is_the_score_of_the_greedy_completion(tmp_path):
    torch.set_num_threads(1)
    # A reward of the prompt alone: the greedy completion scores exactly what the sample scores.
    ppo.train(
        cfg_for(tmp_path, "prompt", max_steps=1, score_baseline="greedy", reward_funcs=[f"{HERE}:prompt_only_reward"])
    )
    row = read_jsonl(tmp_path / "prompt" / "metrics.jsonl")[0]
    assert row["reward/baseline_mean"] == pytest.approx(row["reward/score_mean"]) and row["reward/score_mean"] > 0
    # A reward of the completion: the greedy baseline is the score of the policy's greedy answers.
    cfg = cfg_for(tmp_path, "length", max_steps=1, score_baseline="greedy")
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rewards import RewardFunctions
    from rlhf.rollout import decode_completions, generate, tokenize_prompts

    tok, policy = load_tokenizer("builtin:tiny", padding_side="left"), load_causal_lm("builtin:tiny")
    prompts = ["1+2=", "33+44=", "9+90="]
    ids, mask = tokenize_prompts(tok, prompts)
    greedy = decode_completions(tok, generate(policy, ids, mask, 6, tok.eos_token_id, tok.pad_token_id, greedy=True))
    from accelerate import Accelerator

    model = ppo.PolicyAndValue(policy, torch.nn.Identity())
    got = ppo.greedy_scores(cfg, Accelerator(cpu=True), model, tok, prompts, ids, mask, {},
                            RewardFunctions(cfg.reward_funcs), None, 0)
    assert torch.allclose(got, torch.tensor(length_reward(prompts, greedy)))


@pytest.mark.slow
def test_reward_rises(tmp_path):
    torch.set_num_threads(1)
    ppo.train(cfg_for(tmp_path, max_steps=10, per_device_train_batch_size=16, num_mini_batches=2, num_ppo_epochs=2,
                      learning_rate=2e-3, kl_coef=0.0, reward_funcs=[f"{HERE}:digit_reward"]))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    first = sum(r["reward/score_mean"] for r in rows[:3]) / 3
    last = sum(r["reward/score_mean"] for r in rows[-4:-1]) / 3
    assert last > first + 0.08, (first, last)  # seeds 1-3 gain 0.18-0.25


@pytest.mark.slow
def test_resume_continues_exactly_with_adaptive_kl(tmp_path):
    torch.set_num_threads(1)
    kw = dict(kl_controller="adaptive", kl_coef=0.2, kl_target=1e-3)
    ppo.train(cfg_for(tmp_path, "straight", max_steps=3, **kw))
    ppo.train(cfg_for(tmp_path, "split", max_steps=1, **kw))
    ppo.train(cfg_for(tmp_path, "split", max_steps=3, resume_from_checkpoint="latest", **kw))
    for part in ("model", "value_model"):
        a = load_file(tmp_path / "straight" / part / "model.safetensors")
        b = load_file(tmp_path / "split" / part / "model.safetensors")
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)

    def curve(d):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "completions/per_s"))}
                for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss/policy" in r]

    straight, split = curve("straight"), curve("split")
    assert straight == split and len(split) == 3
    assert len({r["kl/beta"] for r in split}) > 1  # the controller moved beta, and resume kept its state


def test_a_kill_in_the_final_phase_then_resume_gives_the_run_an_uninterrupted_one_does(tmp_path, kill_in_final_phase,
                                                                                       untimed):
    torch.set_num_threads(1)
    kw = dict(num_eval_prompts=8)
    straight = ppo.train(cfg_for(tmp_path, "a", **kw))
    resumed = kill_in_final_phase(ppo.train, lambda **more: cfg_for(tmp_path, "b", **kw, **more))
    assert untimed([resumed]) == untimed([straight]) and "reward/score_mean" in resumed
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    # the final one (the first is start/...)
    assert untimed(b) == untimed(a) and sum("eval/accuracy" in r for r in b) == 1


def test_a_pickle_planted_in_a_checkpoint_never_runs(tmp_path, dir_files, plant_pickle):
    """accelerate unpickles registered custom states with weights_only=False; PPO registers none, so a
    custom_checkpoint_0.pkl (what older versions wrote for the scheduler) is refused, unread."""
    torch.set_num_threads(1)
    ppo.train(cfg_for(tmp_path, max_steps=1, num_ppo_epochs=1, num_mini_batches=1))
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000001"
    (run / "summary.json").unlink()
    marker = plant_pickle(ckpt, "accelerate/custom_checkpoint_0.pkl")
    before = dir_files(run)
    with pytest.raises(ConfigError, match="does not load into this run: .*custom"):
        ppo.train(
            cfg_for(tmp_path, max_steps=2, num_ppo_epochs=1, num_mini_batches=1, resume_from_checkpoint=str(ckpt))
        )
    assert not marker.exists() and dir_files(run) == before


def test_bad_options_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="reward_model_path"):
        make_config(ppo.Config, dict(output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="reward_model_path.*no such model directory"):
        ppo.train(cfg_for(tmp_path, reward_funcs=[], reward_model_path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="reward_funcs"):
        ppo.train(cfg_for(tmp_path, reward_funcs=["oops"]))
    assert not (tmp_path / "run").exists()


def test_lora_policy_uses_itself_as_reference(tmp_path, monkeypatch):
    calls = []
    real = ppo.load_causal_lm
    monkeypatch.setattr(ppo, "load_causal_lm", lambda *a, **k: calls.append(a) or real(*a, **k))
    torch.set_num_threads(1)
    summary = ppo.train(cfg_for(tmp_path, use_peft=True, lora_r=4, max_steps=1, num_ppo_epochs=1, num_mini_batches=1))
    assert len(calls) == 1  # the policy only: the reference is the policy with adapters disabled
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["kl/ref"] == 0.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # merged, plain transformers
    assert summary["step"] == 1
