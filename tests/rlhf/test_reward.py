import json
import pytest
import torch
from safetensors.torch import load_file

from rlhf import reward
from rlhf.core import bradley_terry_loss, ranking_loss
from rlhf.runtime import ConfigError, make_config

torch.set_num_threads(1)

QUICK = dict(num_train_prompts=64, num_eval_prompts=0, progress=False, report_to="none", lr_scheduler_type="constant",
             warmup_ratio=0.0, learning_rate=3e-3)


def _train(tmp_path, name, **kw):
    cfg = make_config(reward.Config, {**QUICK, "output_dir": str(tmp_path / name), **kw})
    return reward.train(cfg), load_file(tmp_path / name / "model" / "model.safetensors")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)}
    for a, b in [(1, 2), (17, 25), (40, 9), (8, 8)]
]


def test_k2_rankings_equal_bradley_terry_through_the_data_path(tmp_path, tiny_tokenizer):
    from rlhf.data import collate_rankings, load_rows, tokenize_rankings
    from rlhf.models import BUILTIN_TINY, load_reward_model

    torch.manual_seed(0)
    model = load_reward_model(BUILTIN_TINY).eval()
    pw = tokenize_rankings(load_rows(_jsonl(tmp_path / "p.jsonl", PAIRS)), tiny_tokenizer, 64).examples
    kwise_rows = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "ranks": [1, 0]} for r in PAIRS]
    kw = tokenize_rankings(load_rows(_jsonl(tmp_path / "k.jsonl", kwise_rows)), tiny_tokenizer, 64).examples
    batch = collate_rankings(kw, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        scores = reward.group_scores(model, batch)  # (B, 2)
        loss_k, metrics = ranking_loss(scores, batch["ranks"])
        # reference: chosen and rejected scored in separate forward passes, Bradley-Terry loss
        chosen = torch.stack([model(input_ids=torch.tensor([g["input_ids"][0]])).logits[0, 0] for g in pw])
        rejected = torch.stack([model(input_ids=torch.tensor([g["input_ids"][1]])).logits[0, 0] for g in pw])
        loss_bt, _ = bradley_terry_loss(chosen, rejected)
    assert torch.allclose(loss_k, loss_bt, atol=1e-5)
    assert torch.allclose(scores[:, 1], chosen, atol=1e-5)


def test_pairwise_and_k2_training_are_identical(tmp_path):
    pw = _jsonl(tmp_path / "p.jsonl", PAIRS)
    kw = _jsonl(tmp_path / "k.jsonl",
                [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "ranks": [0, 1]} for r in PAIRS])
    _, a = _train(tmp_path, "pw", dataset_name=pw, max_steps=2, per_device_train_batch_size=2)
    _, b = _train(tmp_path, "kw", dataset_name=kw, max_steps=2, per_device_train_batch_size=2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_each_response_goes_through_the_model_once_per_step(tmp_path, monkeypatch):
    calls = []
    original = reward.group_scores

    def counting(model, batch):
        calls.append(tuple(batch["input_ids"].shape))
        return original(model, batch)

    monkeypatch.setattr(reward, "group_scores", counting)
    _train(tmp_path, "k4", max_steps=2, per_device_train_batch_size=4, completions_per_prompt=4)
    assert len(calls) == 2 and all(rows == 16 for rows, _ in calls)  # 4 prompts x 4 responses, one pass per step


@pytest.mark.parametrize("logprob_coef", [0.0, 0.5])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, logprob_coef):
    # adam_epsilon=1 makes the update ~ lr * gradient, so float noise in tiny gradients is not blown up to +-lr
    sgd_like = dict(adam_epsilon=1.0, learning_rate=1.0, logprob_coef=logprob_coef)
    _, a = _train(tmp_path, "a", max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1, **sgd_like)
    _, b = _train(tmp_path, "b", max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=8, **sgd_like)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("expand_layers", [0, 1])
def test_resume_continues_exactly(tmp_path, expand_layers):
    kw = dict(max_steps=6, per_device_train_batch_size=4, save_steps=3, lr_scheduler_type="cosine", warmup_ratio=0.2,
              center_rewards_coefficient=0.01, margin=0.1, expand_layers=expand_layers)
    _train(tmp_path, "run", **kw)
    run = tmp_path / "run"
    straight = load_file(run / "model" / "model.safetensors")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    (run / "summary.json").unlink()
    _, resumed = _train(tmp_path, "run", resume_from_checkpoint=str(run / "checkpoints" / "step-00000003"), **kw)
    resumed_rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in rows]
    for a, b in zip(rows, resumed_rows):
        assert a.get("loss/reward") == b.get("loss/reward") and a.get("reward/accuracy") == b.get("reward/accuracy")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_bad_rankings_name_the_line_and_write_nothing(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"prompt": "1+2=", "completions": ["3", "4"], "ranks": [0, 1]},
                                         {"prompt": "1+2=", "completions": ["3", "4", "5"], "ranks": [0, 1]}])
    with pytest.raises(ConfigError, match=r"r\.jsonl: line 2: `ranks` must be a list of 3"):
        _train(tmp_path, "out", dataset_name=path)
    assert not (tmp_path / "out").exists()
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "1+2=", "chosen": "3"}])
    with pytest.raises(ConfigError, match=r"m\.jsonl: missing column `rejected`"):
        _train(tmp_path, "out", dataset_name=missing)
    assert not (tmp_path / "out").exists()


def test_too_long_rankings_are_dropped_and_counted(tmp_path):
    rows = PAIRS + [{"prompt": "1" * 70 + "+1=", "chosen": "1", "rejected": "2"}]
    summary, _ = _train(tmp_path, "long", dataset_name=_jsonl(tmp_path / "l.jsonl", rows), max_steps=1)
    assert summary["data/dropped_too_long"] == 1 and summary["data/train_rankings"] == len(PAIRS)


def test_score_command_prints_model_scores(tmp_path, capsys):
    from rlhf.cli import main

    _train(tmp_path, "rm", max_steps=1, per_device_train_batch_size=4)
    data = _jsonl(tmp_path / "s.jsonl",
                  [{"prompt": "1+2=", "completions": ["3", "4"]}, {"prompt": "5+5=", "completions": ["10", "?"]}])
    capsys.readouterr()
    main(["reward", "score", "--model", str(tmp_path / "rm" / "model"), "--data", data])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert len(rows) == 2, out
    # reference: each response alone through the saved model, loaded with plain transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "rm" / "model")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    for row in rows:
        with torch.no_grad():
            expected = [float(model(**tok(row["prompt"] + c + tok.eos_token, return_tensors="pt")).logits[0, 0])
                        for c in (["3", "4"] if row["prompt"] == "1+2=" else ["10", "?"])]
        assert row["scores"] == pytest.approx(expected, abs=1e-5)
    # conversations (TRL's layout, no `prompt`) score as the chat template's text
    turns = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    chat = _jsonl(tmp_path / "c.jsonl", [{"chosen": turns,
                                          "rejected": [turns[0], {"role": "assistant", "content": "4"}]}])
    text = _jsonl(tmp_path / "t.jsonl", [{"prompt": "<|user|>1+2=\n<|assistant|>", "chosen": "3", "rejected": "4"}])
    [chat_row], [text_row] = (reward.score_rows(str(tmp_path / "rm" / "model"), d) for d in (chat, text))
    assert chat_row["prompt"] == turns[:1] and chat_row["chosen_score"] == text_row["chosen_score"]
    assert chat_row["rejected_score"] == text_row["rejected_score"] != text_row["chosen_score"]
    with pytest.raises(SystemExit):
        main(["reward", "score", "--model", str(tmp_path / "rm" / "model"), "--data", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in capsys.readouterr().err


def test_plackett_luce_loss_type_trains_on_cores_loss(tmp_path, monkeypatch):
    seen = []
    original = reward.group_scores

    def recording(model, batch):
        scores = original(model, batch)
        if model.training:
            seen.append((scores.detach().clone(), batch["ranks"]))
        return scores

    monkeypatch.setattr(reward, "group_scores", recording)
    _train(tmp_path, "pl", max_steps=1, per_device_train_batch_size=8, completions_per_prompt=4,
           loss_type="plackett_luce", center_rewards_coefficient=0.01, logging_steps=1)
    logged = json.loads((tmp_path / "pl" / "metrics.jsonl").read_text().splitlines()[0])
    (scores, ranks), = seen
    pl, _ = ranking_loss(scores, ranks, center_coef=0.01, loss_type="plackett_luce")
    assert logged["loss/reward"] == pytest.approx(float(pl), rel=1e-5)
    assert logged["loss/reward"] != pytest.approx(float(ranking_loss(scores, ranks, center_coef=0.01)[0]), rel=1e-2)
    with pytest.raises(ConfigError, match="`loss_type` must be one of pairwise, plackett_luce; got 'listwise'"):
        _train(tmp_path, "bad", loss_type="listwise")
    with pytest.raises(ConfigError, match="`margin`: applies to loss_type pairwise only"):
        _train(tmp_path, "bad", loss_type="plackett_luce", margin=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["pairwise", "plackett_luce"])
def test_reward_model_learns_gold_ranking(tmp_path, loss_type):
    summary, _ = _train(tmp_path, "learn", num_train_prompts=1500, num_eval_prompts=200, per_device_train_batch_size=16,
                        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, loss_type=loss_type)
    assert summary["eval/accuracy"] >= 0.7 and summary["eval/margin"] > 0  # chance 0.5; seeds 1-3: 0.83-0.85 both


def test_rankings_from_a_sampler_model(tmp_path, tiny_model_dir):
    cfg = make_config(reward.Config, {**QUICK, "output_dir": str(tmp_path / "s"), "sampler_model": str(tiny_model_dir),
                                      "num_train_prompts": 4, "completions_per_prompt": 3})
    rows = reward.builtin_rankings(cfg, ["1+2=", "17+25="], noise=0.5, seed=0)
    assert [len(r["completions"]) for r in rows] == [3, 3] and all(sorted(r["ranks"]) == [0, 1, 2] for r in rows)
    assert rows == reward.builtin_rankings(cfg, ["1+2=", "17+25="], noise=0.5, seed=0)  # seeded


def test_expand_layers_option(tmp_path):
    from rlhf.models import load_reward_model

    _train(tmp_path, "x", max_steps=2, per_device_train_batch_size=4, expand_layers=1)
    assert load_reward_model(str(tmp_path / "x" / "model"), trained=True).config.num_hidden_layers == 4
    with pytest.raises(ConfigError, match="`expand_layers`: must be >= 0, got -1"):
        _train(tmp_path, "bad", expand_layers=-1)


def _reference_scores(model_dir, texts, coef):
    """Score head of the saved model (plain transformers) + coef * log p(response + EOS | prompt) of the same weights
    loaded as a causal LM (its tied LM head), each text forwarded alone; texts: (prompt text, response text)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for prompt, response in texts:
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tok(response, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(float(rm(input_ids=ids).logits[0, 0]) + coef * float(logp[len(head) - 1:].sum()))
    return out


def test_logprob_coef_adds_the_models_own_log_likelihood(tmp_path, tiny_tokenizer):
    from rlhf.rewards import RewardModelScorer

    _train(tmp_path, "rm", max_steps=2, per_device_train_batch_size=4, logprob_coef=0.5)
    model_dir = tmp_path / "rm" / "model"
    assert json.loads((model_dir / "config.json").read_text())["reward_logprob_coef"] == 0.5  # scorers read it
    rows = [{"prompt": "1+2=", "completions": ["3", "4", "12"]}, {"prompt": "17+25=", "completions": ["42", "?"]}]
    got = [v for r in reward.score_rows(str(model_dir), _jsonl(tmp_path / "s.jsonl", rows)) for v in r["scores"]]
    bos, eos = tiny_tokenizer.bos_token, tiny_tokenizer.eos_token
    texts = [(bos + r["prompt"], c + eos) for r in rows for c in r["completions"]]
    assert got == pytest.approx(_reference_scores(model_dir, texts, 0.5), abs=1e-4)
    no_lm = _reference_scores(model_dir, texts, 0.0)
    assert min(abs(a - b) for a, b in zip(got, no_lm)) > 0.1  # the log-likelihood term is really in the score
    # PPO's scorer on a conversational prompt: the completion is the assistant turn (its content and EOS)
    scorer = RewardModelScorer(str(model_dir))
    chat = [{"role": "user", "content": "1+2="}]
    head = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert float(scorer([chat], ["3"])[0]) == pytest.approx(_reference_scores(model_dir, [(head, "3" + eos)], 0.5)[0],
                                                            abs=1e-4)
    with pytest.raises(ConfigError, match="`logprob_coef`: must be >= 0, got -1"):
        _train(tmp_path, "bad", logprob_coef=-1)


def test_logprob_coef_needs_tied_embeddings_and_writes_nothing(tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from rlhf.models.builtin import build_builtin

    build_builtin(LlamaForCausalLM, tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    tiny_tokenizer.save_pretrained(tmp_path / "untied")
    with pytest.raises(ConfigError, match="`logprob_coef`: .*untied has an LM head separate from its input embeddings"):
        _train(tmp_path, "out", model_name_or_path=str(tmp_path / "untied"), logprob_coef=0.1)
    assert not (tmp_path / "out").exists()
    _train(tmp_path, "out", model_name_or_path=str(tmp_path / "untied"), max_steps=1)  # the score head alone works


def test_logprob_coef_reaches_the_model_under_lora():
    from rlhf.models import BUILTIN_TINY, apply_lora, load_reward_model, reward_scores

    torch.manual_seed(0)
    ids, prompt_lens = torch.tensor([[1, 21, 15, 22, 2], [1, 21, 15, 23, 2]]), torch.tensor([3, 3])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = reward_scores(load_reward_model(BUILTIN_TINY), ids, mask, prompt_lens)
        base = load_reward_model(BUILTIN_TINY, logprob_coef=0.5)
        with_lm = reward_scores(base, ids, mask, prompt_lens)
        lora = reward_scores(apply_lora(base, r=4, alpha=8), ids, mask, prompt_lens)  # adapters start at zero
    assert torch.allclose(lora, with_lm, atol=1e-6) and (with_lm - plain).abs().min() > 0.1
