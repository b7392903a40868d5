import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf import reward, sft
from rlhf.runtime import ConfigError, make_config, read_jsonl

torch.set_num_threads(1)

QUICK = dict(num_train_examples=64, num_eval_prompts=0, num_eval_examples=0, eval_pass_at_k=0, progress=False,
             report_to="none", lr_scheduler_type="constant", warmup_ratio=0.0, learning_rate=3e-3)


def _train(tmp_path, name, **kw):
    cfg = make_config(sft.Config, {**QUICK, "output_dir": str(tmp_path / name), **kw})
    return sft.train(cfg), load_file(tmp_path / name / "model" / "model.safetensors")


def test_token_losses_match_transformers_loss(tiny_tokenizer):
    from rlhf.data import collate_sft
    from rlhf.models import BUILTIN_TINY, load_causal_lm

    model = load_causal_lm(BUILTIN_TINY)
    ids = [tiny_tokenizer(t)["input_ids"] for t in ["12+30=42", "1+1=2"]]
    batch = collate_sft([{"input_ids": x, "labels": [-100] * 3 + x[3:]} for x in ids], tiny_tokenizer.pad_token_id)
    per_token, mask = sft.token_losses(model, batch)
    ours = (per_token * mask).sum() / mask.sum()
    theirs = model(**batch).loss  # transformers shifts labels and averages over labels != -100
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert mask.sum() == sum(len(x) - 3 for x in ids)  # completion-only: prompt and padding carry no loss


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    # adam_epsilon=1 makes the update ~ lr * gradient, so float noise in tiny gradients is not blown up to +-lr
    sgd_like = dict(adam_epsilon=1.0, learning_rate=1.0)
    _, one_by_eight = _train(tmp_path, "a", max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                             **sgd_like)
    _, eight_by_one = _train(tmp_path, "b", max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                             **sgd_like)
    for k in one_by_eight:
        assert torch.allclose(one_by_eight[k], eight_by_one[k], atol=1e-6), k


def test_resume_continues_exactly(tmp_path):
    kw = dict(max_steps=6, per_device_train_batch_size=4, save_steps=3, lr_scheduler_type="cosine", warmup_ratio=0.2)
    _train(tmp_path, "run", **kw)
    run = tmp_path / "run"
    straight = load_file(run / "model" / "model.safetensors")
    straight_rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    (run / "summary.json").unlink()
    ckpt = run / "checkpoints" / "step-00000003"
    assert ckpt.is_dir()
    _, resumed = _train(tmp_path, "run", resume_from_checkpoint=str(ckpt), **kw)
    resumed_rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in straight_rows]
    for a, b in zip(straight_rows, resumed_rows):
        assert a.get("loss/sft") == b.get("loss/sft") and a.get("train/lr") == b.get("train/lr")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_a_kill_in_the_final_phase_then_resume_gives_the_run_an_uninterrupted_one_does(tmp_path, kill_in_final_phase,
                                                                                       untimed):
    kw = dict(max_steps=3, per_device_train_batch_size=4, num_eval_examples=16)
    straight, _ = _train(tmp_path, "a", **kw)
    resumed = kill_in_final_phase(
        sft.train, lambda **more: make_config(sft.Config, {**QUICK, "output_dir": str(tmp_path / "b"), **kw, **more})
    )
    assert untimed([resumed]) == untimed([straight]) and resumed["train/loss_last"] is not None
    a, b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert untimed(b) == untimed(a) and sum("eval/loss" in r for r in b) == 1


@pytest.mark.parametrize("how, message", [
    ("truncated model.safetensors", r"model.safetensors has \d+ bytes, \d+ when it was written"),
    ("garbled trainer_state.pt", r"cannot load .*trainer_state.pt"),
    ("run directory", r"is a run directory, not a checkpoint"),
    ("reward's", r"is a checkpoint of `rlhf sft`, not of `rlhf reward`"),
])
def test_a_bad_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, dir_files, how, message):
    _train(tmp_path, "run", max_steps=1, per_device_train_batch_size=4)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000001"
    (run / "summary.json").unlink()
    if how == "truncated model.safetensors":
        weights = ckpt / "accelerate" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbled trainer_state.pt":  # same size, so only loading it can tell
        data = bytearray((ckpt / "trainer_state.pt").read_bytes())
        data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
        (ckpt / "trainer_state.pt").write_bytes(bytes(data))
    module, options = (reward, dict(progress=False, report_to="none")) if how == "reward's" else (sft, QUICK)
    before = dir_files(run)
    with pytest.raises(ConfigError, match=message):
        module.train(
            make_config(
                module.Config,
                {
                    **options,
                    "output_dir": str(run),
                    "max_steps": 2,
                    "per_device_train_batch_size": 4,
                    "resume_from_checkpoint": str(run if how == "run directory" else ckpt),
                },
            )
        )
    assert dir_files(run) == before  # config.yaml not rewritten, nothing else touched


def test_lora_adapter_and_merged_save(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.models import BUILTIN_TINY, load_causal_lm

    lora = dict(max_steps=3, per_device_train_batch_size=8, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                learning_rate=1e-2)
    _train(tmp_path, "merged", **lora)
    cfg = make_config(sft.Config, {**QUICK, **lora, "output_dir": str(tmp_path / "adapter"), "save_adapter_only": True})
    sft.train(cfg)
    assert (tmp_path / "adapter" / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    with_adapter = PeftModel.from_pretrained(load_causal_lm(BUILTIN_TINY), tmp_path / "adapter" / "model").eval()
    base = load_causal_lm(BUILTIN_TINY).eval()
    x = torch.tensor([[1, 5, 6, 76, 7, 84]])
    with torch.no_grad():
        m, a, b = merged(x).logits, with_adapter(x).logits, base(x).logits
    assert torch.allclose(m, a, atol=1e-5)
    assert not torch.allclose(m, b, atol=1e-3)  # the adapters learned something


def test_chat_messages_and_packing_run(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}
            )
            + "\n"
            for i in range(20)
        )
    )
    summary, _ = _train(tmp_path, "chat", dataset_name=str(path), max_steps=2, per_device_train_batch_size=4)
    assert summary["data/train_examples"] == 20 and summary["step"] == 2
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(40)))
    summary, _ = _train(tmp_path, "packed", dataset_name=str(text), packing=True, max_length=16, max_steps=2,
                        per_device_train_batch_size=2)
    assert summary["data/train_examples"] == sum(len(f"{i}+{i}={2 * i}") + 2 for i in range(40)) // 16


def test_bad_input_fails_before_writing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: missing column `completion`"):
        _train(tmp_path, "out", dataset_name=str(path), max_steps=1)
    assert not (tmp_path / "out").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"prompt": "1+2=", "completion": "3"})
        + "\n"
        + json.dumps({"prompt": "9" * 70 + "+1=", "completion": "1"})
        + "\n"
    )
    summary, _ = _train(tmp_path, "long", dataset_name=str(long), max_steps=1, per_device_train_batch_size=1)
    assert summary["data/dropped_too_long"] == 1 and summary["data/train_examples"] == 1
    with pytest.raises(ConfigError, match="save_adapter_only"):
        make_config(sft.Config, {"save_adapter_only": True})


@pytest.mark.slow
def test_sft_learns_format_and_plain_transformers_reproduce_greedy(sft_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.tasks import arithmetic as ar

    summary = json.loads((sft_model_dir.parent / "summary.json").read_text())
    assert summary["eval/well_formed"] >= 0.9  # 60 steps teach the format; the targets need the shipped config
    tok = AutoTokenizer.from_pretrained(sft_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_model_dir).eval()
    prompts = ar.make_prompts(16, 5, split="eval")
    ours = [c for c, _ in ar.generate_completions(model, tok, prompts, batch_size=5)]
    plain = []
    for p in prompts:  # one prompt at a time, no padding: the plain-transformers way
        x = tok(p, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=8, do_sample=False)
        plain.append(tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    assert ours == plain


def test_gradient_checkpointing_gives_the_same_update_and_bf16_runs(tmp_path):
    kw = dict(max_steps=2, per_device_train_batch_size=8, adam_epsilon=1.0, learning_rate=1.0)
    _, plain = _train(tmp_path, "plain", **kw)
    _, checkpointed = _train(tmp_path, "gc", gradient_checkpointing=True, **kw)
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], atol=1e-6), k
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed per process state
    try:
        summary, _ = _train(tmp_path, "bf16", bf16=True, max_steps=1, per_device_train_batch_size=8)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["step"] == 1 and summary["train/loss_last"] > 0
