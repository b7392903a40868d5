import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rlhf import dpo
from rlhf.core import dpo_loss
from rlhf.runtime import ConfigError, load_state, make_config

torch.set_num_threads(1)

QUICK = dict(num_train_prompts=64, num_eval_prompts=0, num_greedy_eval_prompts=0, progress=False, report_to="none",
             lr_scheduler_type="constant", warmup_ratio=0.0, learning_rate=3e-3)
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)}
         for a, b in [(1, 2), (17, 25), (40, 9), (8, 8)]]


def _train(tmp_path, name, **kw):
    cfg = make_config(dpo.Config, {**QUICK, "output_dir": str(tmp_path / name), **kw})
    return dpo.train(cfg), load_file(tmp_path / name / "model" / "model.safetensors")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ranked_batch(tmp_path, tokenizer, rows):
    """The untrained tiny model (seed 0) and `rows` (rankings) collated as `rlhf dpo` batches them."""
    from rlhf.data import load_rows, tokenize_rankings
    from rlhf.models import BUILTIN_TINY, load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(BUILTIN_TINY).eval()
    groups = tokenize_rankings(load_rows(_jsonl(tmp_path / "k.jsonl", rows)), tokenizer, 64).examples
    return model, dpo.collate(groups, tokenizer.pad_token_id)


def _alone(model, tokenizer, prompt: str, completion: str) -> list[float]:
    """Log-prob of each token of completion + EOS after prompt, the pair forwarded alone through log_softmax."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))]


@pytest.mark.parametrize("share", [True, False])
def test_response_logps_and_loss_match_one_response_at_a_time(tmp_path, tiny_tokenizer, share):
    """Batched K-wise log-probs (sum over the response's tokens and EOS) equal each response scored alone with
    log_softmax, the prompt shared or not; the loss then equals the paper's formula on those numbers."""
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "52"], "ranks": [0, 2, 1]},
            {"prompt": "1+1=", "completions": ["2", "11"], "ranks": [0, 1]}]
    model, batch = _ranked_batch(tmp_path, tiny_tokenizer, rows)
    with torch.no_grad():
        got = dpo.response_logps(model, batch, share)  # (2, 3)
        got_mean = got / dpo.response_tokens(batch)
    for b, row in enumerate(rows):
        for k, c in enumerate(row["completions"]):
            terms = _alone(model, tiny_tokenizer, row["prompt"], c)
            assert float(got[b, k]) == pytest.approx(sum(terms), abs=1e-4)
            assert float(got_mean[b, k]) == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert got[1, 2] == 0 and batch["ranks"][1, 2] == -1  # padding response
    ref = got.detach() - torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.0, 0.0]])  # logps - ref_logps
    loss, _ = dpo_loss(got, got - (got - ref), batch["ranks"], beta=0.5)
    r = 0.5 * (got - ref)
    want = ((-F.logsigmoid(r[0, 0] - r[0, 2]) - F.logsigmoid(r[0, 0] - r[0, 1]) - F.logsigmoid(r[0, 2] - r[0, 1])) / 3
            - F.logsigmoid(r[1, 0] - r[1, 1])) / 2
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_adds_the_best_responses_nll_per_token(tmp_path, tiny_tokenizer, loss_type):
    """batch_loss with rpo_alpha = the DPO loss + alpha * mean over prompts of -log p(best response) / its tokens,
    the log-prob taken from each best response scored alone (ties: the mean of the tied best)."""
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "52"], "ranks": [0, 2, 0]},
            {"prompt": "1+1=", "completions": ["2", "11"], "ranks": [0, 1]}]
    model, batch = _ranked_batch(tmp_path, tiny_tokenizer, rows)
    batch["ref_logps"] = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, 0.0]])
    with torch.no_grad():
        plain, _ = _batch_loss(model, batch, make_config(dpo.Config, {"loss_type": loss_type}))
        with_rpo, metrics = _batch_loss(model, batch, make_config(dpo.Config, {"loss_type": loss_type,
                                                                               "rpo_alpha": 0.7}))
    nll = []
    for row in rows:
        best = [_alone(model, tiny_tokenizer, row["prompt"], c) for c, rank in zip(row["completions"], row["ranks"])
                if rank == 0]
        nll.append(sum(-sum(terms) / len(terms) for terms in best) / len(best))
    assert float(metrics["loss/nll"]) == pytest.approx(sum(nll) / 2, abs=1e-5)
    assert float(with_rpo - plain) == pytest.approx(0.7 * sum(nll) / 2, abs=1e-5)


def test_a_list_of_losses_is_their_weighted_sum(tmp_path, tiny_tokenizer):
    """loss_type [sigmoid, ipo, sft] weighted [0.7, 0.3, 0.5] = 0.7 x the sigmoid loss + 0.3 x the IPO loss (on mean
    log-probs) + 0.5 x the best response's NLL, each computed alone; rewards/* are the first loss's; sft weighted a
    is rpo_alpha a, bit for bit."""
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "52"], "ranks": [0, 2, 1]},
            {"prompt": "1+1=", "completions": ["2", "11"], "ranks": [0, 1]}]
    model, batch = _ranked_batch(tmp_path, tiny_tokenizer, rows)
    batch["ref_logps"] = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, 0.0]])
    with torch.no_grad():
        alone = {t: _batch_loss(model, batch, make_config(dpo.Config, {"loss_type": t})) for t in ("sigmoid", "ipo")}
        rpo, mr = _batch_loss(model, batch, make_config(dpo.Config, {"rpo_alpha": 0.5}))
        loss, m = _batch_loss(model, batch, make_config(dpo.Config, {"loss_type": "sigmoid,ipo,sft",
                                                                     "loss_weights": [0.7, 0.3, 0.5]}))
        sft, _ = _batch_loss(model, batch, make_config(dpo.Config, {"loss_type": ["sigmoid", "sft"],
                                                                    "loss_weights": [1, 0.5]}))
    (sig, ms), (ipo, mi), nll = alone["sigmoid"], alone["ipo"], mr["loss/nll"]
    assert float(rpo) == pytest.approx(float(sig + 0.5 * nll), abs=1e-6)
    assert float(loss) == pytest.approx(float(0.7 * sig + 0.3 * ipo + 0.5 * nll), abs=1e-6)
    assert float(m["loss/dpo"]) == pytest.approx(float(0.7 * sig + 0.3 * ipo), abs=1e-6)
    assert (m["loss/sigmoid"], m["loss/ipo"], m["loss/nll"]) == (ms["loss/dpo"], mi["loss/dpo"], nll)
    assert m["rewards/margins"] == ms["rewards/margins"] != mi["rewards/margins"]
    assert torch.equal(sft, rpo)


def _batch_loss(model, batch, cfg):
    class NoAccelerator:  # batch_loss on one process, no autocast
        autocast = staticmethod(contextlib.nullcontext)

    return dpo.batch_loss(NoAccelerator(), model, None, batch, cfg)


def test_each_response_goes_through_the_model_once_per_step(tmp_path, monkeypatch):
    calls = []
    original = dpo.response_logps

    def counting(model, batch, *args):
        calls.append(batch["completion_ids"].shape[0])
        return original(model, batch, *args)

    monkeypatch.setattr(dpo, "response_logps", counting)
    _train(tmp_path, "k4", max_steps=2, per_device_train_batch_size=4, completions_per_prompt=4, num_train_prompts=8)
    assert calls == [32, 16, 16]  # the reference pass over the 8 rankings once, then 4 prompts x 4 responses per step
    calls.clear()
    _train(tmp_path, "fly", max_steps=2, per_device_train_batch_size=4, completions_per_prompt=4, num_train_prompts=8,
           precompute_ref_log_probs=False)
    assert calls == [16, 16, 16, 16]  # per step: the policy and the frozen reference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_prefix_gives_the_same_logps_and_gradients(tmp_path, tiny_tokenizer, checkpointing):
    """Prompts of different lengths, a pair next to K-rankings with ties and a group padded to K: encoding each
    prompt once gives the values and parameter gradients of forwarding every prompt + response in full (with
    gradient checkpointing too: no KV cache is involved)."""
    from rlhf.data import load_rows, tokenize_rankings
    from rlhf.models import BUILTIN_TINY, load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(BUILTIN_TINY, gradient_checkpointing=checkpointing).train()
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "52", "42 "], "ranks": [0, 2, 1, 0]},
            {"prompt": "1+1=", "completions": ["2", "11"], "ranks": [0, 1]},
            {"prompt": "123+456=", "completions": ["579", "-", "5790"], "ranks": [0, 1, 1]},
            {"prompt": "1+1=", "completions": ["2", "3", "1"], "ranks": [0, 2, 1]}]  # same prompt as the row before
    groups = tokenize_rankings(load_rows(_jsonl(tmp_path / "k.jsonl", rows)), tiny_tokenizer, 64).examples
    batch = dpo.collate(groups, tiny_tokenizer.pad_token_id)
    assert batch["prompt_ids"].shape[0] == 4 and batch["ranks"][1].tolist() == [0, 1, -1, -1]
    params = list(model.parameters())
    for norm in (1, dpo.response_tokens(batch)):  # sums, means
        plain, shared = (dpo.response_logps(model, batch, share) / norm for share in (False, True))  # (4, 4)
        assert torch.allclose(plain, shared, atol=1e-5), (plain - shared).abs().max()
        assert shared[1, 2] == 0 and shared[1, 3] == 0  # padding responses
        weights = torch.randn(plain.shape)  # any function of the log-probs: its gradient must match
        for a, b in zip(torch.autograd.grad((plain * weights).sum(), params),
                        torch.autograd.grad((shared * weights).sum(), params)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_pairwise_and_k2_training_are_identical(tmp_path):
    pw = _jsonl(tmp_path / "p.jsonl", PAIRS)
    kw = _jsonl(tmp_path / "k.jsonl",
                [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "ranks": [0, 1]} for r in PAIRS])
    swapped = _jsonl(tmp_path / "s.jsonl", [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]],
                                             "ranks": [1, 0]} for r in PAIRS])
    kw_ = dict(max_steps=2, per_device_train_batch_size=2, adam_epsilon=1.0, learning_rate=1.0)  # update ~ gradient
    _, a = _train(tmp_path, "pw", dataset_name=pw, **kw_)
    _, b = _train(tmp_path, "kw", dataset_name=kw, **kw_)
    _, c = _train(tmp_path, "sw", dataset_name=swapped, **kw_)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.allclose(a[k], c[k], atol=1e-6), k  # the order of the responses does not matter


def test_conversational_pairs_train_as_their_rendered_chat(tmp_path):
    """TRL's conversational layout (whole conversations, no `prompt`) trains exactly as the chat template's text."""
    def turn(role, text):
        return {"role": role, "content": text}

    chats = [{"chosen": [turn("user", r["prompt"]), turn("assistant", r["chosen"])],
              "rejected": [turn("user", r["prompt"]), turn("assistant", r["rejected"])]} for r in PAIRS]
    rendered = [{**r, "prompt": f"<|user|>{r['prompt']}\n<|assistant|>"} for r in PAIRS]
    kw = dict(max_steps=2, per_device_train_batch_size=2, precompute_ref_log_probs=False)
    chat_summary, chat_weights = _train(tmp_path, "chat", dataset_name=_jsonl(tmp_path / "c.jsonl", chats), **kw)
    text_summary, text_weights = _train(tmp_path, "text", dataset_name=_jsonl(tmp_path / "t.jsonl", rendered), **kw)
    assert chat_summary["train/loss_last"] == text_summary["train/loss_last"]
    for k in text_weights:
        assert torch.equal(chat_weights[k], text_weights[k]), k
    assert not torch.equal(text_weights["model.norm.weight"], _train(tmp_path, "plain", dataset_name=_jsonl(
        tmp_path / "p.jsonl", PAIRS), **kw)[1]["model.norm.weight"])  # the chat's tokens are what trains


@pytest.mark.parametrize("precompute", [True, False])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, precompute):
    # adam_epsilon=1 makes the update ~ lr * gradient, so float noise in tiny gradients is not blown up to +-lr
    kw = dict(adam_epsilon=1.0, learning_rate=1.0, max_steps=2, precompute_ref_log_probs=precompute, beta=1.0)
    _, a = _train(tmp_path, "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, **kw)
    _, b = _train(tmp_path, "b", per_device_train_batch_size=1, gradient_accumulation_steps=8, **kw)
    _, c = _train(tmp_path, "c", per_device_train_batch_size=4, gradient_accumulation_steps=1, **{**kw, "max_steps": 4})
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)  # the check can tell different updates apart


def test_precompute_ref_batch_size_batches_the_reference_pass_only(tmp_path, monkeypatch):
    """The pass before training runs in batches of `precompute_ref_batch_size`; its log-probs, and so the training,
    are those of the default batching (to float tolerance)."""
    sizes, collate = [], dpo.collate
    monkeypatch.setattr(dpo, "collate", lambda groups, pad: sizes.append(len(groups)) or collate(groups, pad))
    kw = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    a, wa = _train(tmp_path, "a", precompute_ref_batch_size=3, **kw)
    assert sizes[:21] == [3] * 21 and sizes[21] == 1  # 64 prompts: 21 batches of 3 and one of 1, then training
    sizes.clear()
    b, wb = _train(tmp_path, "b", **kw)
    assert sizes[0] == 64  # per_device_eval_batch_size
    assert a["train/loss_last"] == pytest.approx(b["train/loss_last"], abs=1e-5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    with pytest.raises(ConfigError, match="precompute_ref_batch_size"):
        make_config(dpo.Config, {**QUICK, "precompute_ref_batch_size": -1})


def test_reference_pass_scores_each_group_as_alone(tmp_path, tiny_tokenizer, monkeypatch):
    """The pass before training batches groups of like shapes (not the file's order) and stores, for each group,
    the log-probs it gets scored alone; K varies between groups."""
    from rlhf.data import load_rows, tokenize_rankings
    from rlhf.models import BUILTIN_TINY, load_causal_lm
    from rlhf.training import setup_accelerator

    rows = [{"prompt": p, "completions": c, "ranks": list(range(len(c)))} for p, c in [
        ("1+2=", ["3", "123456"]), ("10+20+30=", ["60", "6"]), ("4+4=", ["8", "88", "888"]), ("7+1=", ["8", "9"]),
        ("20+30+40=", ["90", "9999", "0"]), ("2+2=", ["4", "44444"])]]
    groups = tokenize_rankings(load_rows(_jsonl(tmp_path / "k.jsonl", rows)), tiny_tokenizer, 64).examples
    cfg = make_config(dpo.Config, {**QUICK, "output_dir": str(tmp_path / "run")})
    model = load_causal_lm(BUILTIN_TINY).eval()
    seen, collate = [], dpo.collate
    shape = dpo.collate_shape
    monkeypatch.setattr(dpo, "collate", lambda gs, pad: seen.append([shape(g) for g in gs]) or collate(gs, pad))
    dpo.add_reference_logps(setup_accelerator(cfg), model, groups, cfg, tiny_tokenizer.pad_token_id, 2)
    assert [s for batch in seen for s in batch] == sorted(shape(g) for g in groups)
    for g in groups:
        with torch.no_grad():
            alone = dpo.response_logps(model, collate([g], tiny_tokenizer.pad_token_id), True)[0]  # (K,)
        assert g["ref_logps"] == pytest.approx(alone.tolist(), abs=1e-4)


TR_DPO = dict(sync_ref_model=True, precompute_ref_log_probs=False, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "plackett_luce", "tr-dpo"])  # tr-dpo: the reference moves
def test_resume_continues_exactly(tmp_path, loss_type):
    """A run resumed from its step-3 checkpoint repeats the rest of the uninterrupted one, bit for bit (TR-DPO: from
    a reference updated at step 2, which the checkpoint holds)."""
    more = TR_DPO if loss_type == "tr-dpo" else {"loss_type": loss_type}
    kw = dict(max_steps=6, per_device_train_batch_size=4, save_steps=3, lr_scheduler_type="cosine", warmup_ratio=0.2,
              beta=0.5, **more)
    _train(tmp_path, "run", **kw)
    run = tmp_path / "run"
    straight = load_file(run / "model" / "model.safetensors")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    (run / "summary.json").unlink()
    _, resumed = _train(tmp_path, "run", resume_from_checkpoint=str(run / "checkpoints" / "step-00000003"), **kw)
    resumed_rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in rows]
    for a, b in zip(rows, resumed_rows):
        assert a.get("loss/dpo") == b.get("loss/dpo") and a.get("rewards/margins") == b.get("rewards/margins")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_tr_dpo_mixes_the_policy_into_the_reference(tmp_path):
    """ref_model_mixup_alpha 1 every step: each step starts with the reference equal to the policy, so every
    implicit reward is 0 and the loss log 2; alpha 0.6 every 2 steps: after step 2 the reference is 0.6 x the
    policy + 0.4 x the starting model (read back from the step-2 checkpoint)."""
    _train(tmp_path, "hard", max_steps=3, per_device_train_batch_size=4, **{**TR_DPO, "ref_model_sync_steps": 1,
                                                                            "ref_model_mixup_alpha": 1.0})
    rows = [r for r in map(json.loads, open(tmp_path / "hard" / "metrics.jsonl")) if "loss/dpo" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6) and abs(r["rewards/margins"]) < 1e-6
    assert rows[-1]["train/grad_norm"] > 0  # and yet the policy moves: log 2's gradient is not 0

    from rlhf.models import BUILTIN_TINY, load_causal_lm

    torch.manual_seed(0)
    start = dict(load_causal_lm(BUILTIN_TINY).named_parameters())  # QUICK trains the untrained tiny model, seed 0
    _train(tmp_path, "soft", max_steps=2, per_device_train_batch_size=4, save_steps=2, **TR_DPO)
    saved = load_state(tmp_path / "soft" / "checkpoints" / "step-00000002" / "trainer_state.pt", restore_rng=False)
    policy = load_file(tmp_path / "soft" / "model" / "model.safetensors")
    for name, p in start.items():  # the parameters (lm_head is tied to the embedding)
        want = 0.6 * policy[name] + 0.4 * p.detach()
        torch.testing.assert_close(saved["reference"][name], want, rtol=1e-6, atol=1e-6)


def test_lora_reference_is_the_model_with_adapters_off(tmp_path):
    """With LoRA no reference copy is loaded; per-batch reference log-probs (adapters off) train as precomputed ones."""
    kw = dict(use_peft=True, lora_dropout=0.0, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    cfg = make_config(dpo.Config, {**QUICK, **kw, "precompute_ref_log_probs": False, "output_dir": str(tmp_path)})
    assert dpo.load_reference(cfg) is None
    a, wa = _train(tmp_path, "pre", **kw)
    b, wb = _train(tmp_path, "fly", precompute_ref_log_probs=False, **kw)
    assert a["train/loss_last"] == pytest.approx(b["train/loss_last"], abs=1e-5)
    assert a["train/loss_last"] != pytest.approx(0.6931, abs=1e-4)  # the policy moved away from the reference
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


MORE = "exo_pair,nca_pair,bco_pair,sppo_hard,apo_zero,apo_down,discopop,sigmoid_norm"  # one run, every loss once


@pytest.mark.parametrize("loss_type", ["robust", "ipo", "hinge", "simpo", MORE])
def test_every_loss_type_trains_and_logs_trl_metrics(tmp_path, loss_type):
    eps = {"robust": 0.1, "simpo": 0.1, MORE: 1e-3}.get(loss_type, 0.0)
    name = loss_type.split(",")[0]
    summary, _ = _train(tmp_path, name, loss_type=loss_type, label_smoothing=eps, max_steps=2,
                        per_device_train_batch_size=4, num_eval_prompts=8)
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    more = [f"loss/{t}" for t in loss_type.split(",")] if "," in loss_type else []
    for key in ["loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"] + more:
        assert all(math.isfinite(r[key]) for r in rows if "step" in r and "train/epoch" in r), key
    assert 0 <= summary["eval/preference_accuracy"] <= 1


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_train_and_evaluate_on_their_rewards(tmp_path, f):
    """f-DPO with a loss list: finite metrics, and at the start (the policy is the reference) rewards of 0 and the
    sigmoid loss log 2, as in DPO."""
    summary, _ = _train(tmp_path, f, loss_type="sigmoid,ipo", f_divergence_type=f, max_steps=2,
                        per_device_train_batch_size=4, num_eval_prompts=8)
    rows = [r for r in map(json.loads, open(tmp_path / f / "metrics.jsonl")) if "loss/sigmoid" in r]
    assert rows[0]["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["rewards/margins"] == 0
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert 0 <= summary["eval/preference_accuracy"] <= 1 and math.isfinite(summary["eval/rewards/margins"])


@pytest.mark.parametrize("share", [True, False])
def test_ld_dpo_logps_cut_each_pair_at_its_shorter_response(tmp_path, tiny_tokenizer, share):
    """ld_alpha: response i's log-prob against j is its first min(len_i, len_j) tokens' (EOS included) plus alpha
    times the rest's, from each response scored alone; the diagonal is the plain sum."""
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "5232"], "ranks": [0, 2, 1]},
            {"prompt": "1+1=", "completions": ["2", "111"], "ranks": [0, 1]}]
    model, batch = _ranked_batch(tmp_path, tiny_tokenizer, rows)
    with torch.no_grad():
        got = dpo.response_logps(model, batch, share, ld_alpha=0.25)  # (2, 3, 3)
        plain = dpo.response_logps(model, batch, share)
    for b, row in enumerate(rows):
        terms = [_alone(model, tiny_tokenizer, row["prompt"], c) for c in row["completions"]]
        for i, j in [(i, j) for i in range(len(terms)) for j in range(len(terms))]:
            n = min(len(terms[i]), len(terms[j]))
            assert float(got[b, i, j]) == pytest.approx(sum(terms[i][:n]) + 0.25 * sum(terms[i][n:]), abs=1e-4)
    assert torch.allclose(got.diagonal(dim1=1, dim2=2), plain, atol=1e-5)


def test_ld_dpo_trains_with_the_reference_precomputed_or_per_batch(tmp_path):
    """ld_alpha: the per-pair reference log-probs stored before training (K x K per ranking) and those computed per
    batch train the same model; alpha 1 trains plain DPO's; alpha 0.5 another one."""
    kw = dict(max_steps=3, per_device_train_batch_size=4, completions_per_prompt=3, learning_rate=1e-2,
              num_eval_prompts=8)
    a, wa = _train(tmp_path, "pre", ld_alpha=0.5, **kw)
    b, wb = _train(tmp_path, "fly", ld_alpha=0.5, precompute_ref_log_probs=False, **kw)
    one = _train(tmp_path, "one", ld_alpha=1.0, **kw)[1]
    plain = _train(tmp_path, "plain", **kw)[1]
    assert a["train/loss_last"] == pytest.approx(b["train/loss_last"], abs=1e-5)
    assert a["eval/preference_accuracy"] == pytest.approx(b["eval/preference_accuracy"])
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
        assert torch.allclose(one[k], plain[k], atol=1e-5), k
    assert any(not torch.allclose(wa[k], plain[k], atol=1e-4) for k in wa)


@pytest.mark.parametrize("share", [True, False])
def test_wpo_weights_are_each_response_alones(tmp_path, tiny_tokenizer, share):
    """use_weighting: a response's weight is exp of the mean over its tokens (EOS included) of log p(token) -
    log sum_v p(v)^2, from the response scored alone; batch_loss is the loss with each pair times its two weights."""
    rows = [{"prompt": "12+30=", "completions": ["42", "4", "5232"], "ranks": [0, 2, 1]},
            {"prompt": "1+1=", "completions": ["2", "111"], "ranks": [0, 1]}]
    model, batch = _ranked_batch(tmp_path, tiny_tokenizer, rows)
    with torch.no_grad():
        logps, weights = dpo.response_logps(model, batch, share, with_weights=True)
    assert torch.equal(logps, dpo.response_logps(model, batch, share))
    for b, row in enumerate(rows):
        for k, c in enumerate(row["completions"]):
            prompt_ids = tiny_tokenizer(row["prompt"])["input_ids"]
            ids = prompt_ids + tiny_tokenizer(c, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
            terms = [float(logp[t - 1, ids[t]] - torch.logsumexp(2 * logp[t - 1], 0)) for t in range(len(prompt_ids),
                                                                                                   len(ids))]
            assert float(weights[b, k]) == pytest.approx(math.exp(sum(terms) / len(terms)), rel=1e-4)
    batch["ref_logps"] = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, 0.0]])
    with torch.no_grad():
        loss, _ = _batch_loss(model, batch, make_config(dpo.Config, {"use_weighting": True,
                                                                     "share_prompt_prefix": share}))
    want, _ = dpo_loss(logps, batch["ref_logps"], batch["ranks"], weights=weights)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_wpo_trains_with_the_reference_precomputed_or_per_batch(tmp_path):
    kw = dict(max_steps=3, per_device_train_batch_size=4, completions_per_prompt=3, learning_rate=1e-2,
              num_eval_prompts=8, use_weighting=True)
    a, wa = _train(tmp_path, "pre", **kw)
    b, wb = _train(tmp_path, "fly", precompute_ref_log_probs=False, **kw)
    plain = _train(tmp_path, "plain", **{**kw, "use_weighting": False})[1]
    assert a["train/loss_last"] == pytest.approx(b["train/loss_last"], abs=1e-6) and math.isfinite(a["train/loss_last"])
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert any(not torch.allclose(wa[k], plain[k], atol=1e-4) for k in wa)


def test_dpo_on_builtin_rankings_orders_held_out_pairs(tmp_path, sft_model_dir):
    summary, _ = _train(tmp_path, "learn", model_name_or_path=str(sft_model_dir), num_train_prompts=256,
                        num_eval_prompts=100, num_greedy_eval_prompts=32, max_steps=30, per_device_train_batch_size=16,
                        learning_rate=1e-3, beta=0.1)
    # the reference orders no pair (every implicit reward is 0): accuracy starts at 0
    assert summary["eval/preference_accuracy"] >= 0.6 and summary["eval/rewards/margins"] > 0
    assert "eval/accuracy" in summary


def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path):
    cases = [
        ([{"prompt": "1+2=", "completions": ["3", "4"], "ranks": [0, 1]},
          {"prompt": "1+2=", "completions": ["3", "4", "5"], "ranks": [0, 1]}], r"r\.jsonl: line 2: `ranks` must be"),
        ([{"prompt": "1+2=", "chosen": "3"}], r"r\.jsonl: missing column `rejected`"),
        ([{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "1+2=", "chosen": " ", "rejected": "4"}],
         r"r\.jsonl: line 2: empty"),
        ([{"prompt": "", "completions": ["3", "4"], "ranks": [0, 1]}], r"r\.jsonl: line 1: empty or non-string"),
    ]
    for rows, message in cases:
        with pytest.raises(ConfigError, match=message):
            _train(tmp_path, "out", dataset_name=_jsonl(tmp_path / "r.jsonl", rows))
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_config(dpo.Config, {"loss_type": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="loss_type"):
        make_config(dpo.Config, {"loss_type": "kto"})
    with pytest.raises(ConfigError, match="rpo_alpha"):
        make_config(dpo.Config, {"rpo_alpha": -1.0})
    for bad, message in [({"loss_type": "sigmoid,kto"}, "`loss_type` must be one of .*got 'kto'"),
                         ({"loss_type": "sft"}, "loss_type.*needs a preference loss"),
                         ({"loss_type": "sigmoid,sigmoid"}, "loss_type.*twice"),
                         ({"loss_type": "simpo,sigmoid"}, "loss_type.*simpo"),
                         ({"loss_type": "sigmoid,ipo", "loss_weights": [1.0]}, "loss_weights.*one weight per"),
                         ({"loss_weights": [-1.0]}, "loss_weights.*positive"),
                         ({"loss_type": "exo_pair"}, "label_smoothing.*exo_pair"),
                         ({"loss_type": "hinge,nca_pair", "label_smoothing": 0.1}, "label_smoothing.*applies to"),
                         ({"loss_type": "sigmoid,sft", "rpo_alpha": 0.1}, "rpo_alpha.*same term"),
                         ({"discopop_tau": 0.0}, "discopop_tau"),
                         ({"sync_ref_model": True}, "sync_ref_model.*precompute_ref_log_probs false"),
                         ({**TR_DPO, "use_peft": True}, "sync_ref_model.*use_peft"),
                         ({**TR_DPO, "loss_type": "simpo"}, "sync_ref_model.*needs a reference"),
                         ({"ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
                         ({"ref_model_sync_steps": 0}, "ref_model_sync_steps"),
                         ({"f_divergence_type": "js_divergence", "loss_type": "sigmoid,nca_pair"},
                          "f_divergence_type.*reward differences.*'nca_pair'"),
                         ({"f_divergence_type": "forward_kl", "reference_free": True}, "f_divergence_type.*reference"),
                         ({"f_divergence_type": "kl"}, "`f_divergence_type` must be one of"),
                         ({"f_alpha_divergence_coef": 0.0}, "f_alpha_divergence_coef"),
                         ({"ld_alpha": 1.5}, "`ld_alpha`: must be in \\[0, 1\\]"),
                         ({"ld_alpha": 0.5, "loss_type": "sigmoid,ipo"}, "ld_alpha.*not for \\['ipo'\\]"),
                         ({"ld_alpha": 0.5, "loss_type": "plackett_luce"}, "ld_alpha.*plackett_luce"),
                         ({"use_weighting": True, "loss_type": "plackett_luce"}, "use_weighting.*plackett_luce")]:
        with pytest.raises(ConfigError, match=message):
            make_config(dpo.Config, bad)


def test_loss_lists_from_the_command_line_and_yaml(tmp_path):
    from rlhf.runtime import parse_config

    cfg = parse_config(dpo.Config, ["--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1"])
    assert cfg.losses == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    (tmp_path / "c.yaml").write_text("loss_type: [apo_zero, sft]\nrpo_alpha: 0\n")
    assert parse_config(dpo.Config, ["--config", str(tmp_path / "c.yaml")]).losses == [("apo_zero", 1.0), ("sft", 1.0)]
    (tmp_path / "one.yaml").write_text("loss_type: ipo\nrpo_alpha: 0.5\n")
    cfg = parse_config(dpo.Config, ["--config", str(tmp_path / "one.yaml")])
    assert cfg.losses == [("ipo", 1.0), ("sft", 0.5)] and cfg.length_normalised
    with pytest.raises(ConfigError, match="`loss_type` must be one of"):
        parse_config(dpo.Config, ["--loss_type", "sigmoid,dpop"])
    with pytest.raises(ConfigError, match=r"--loss_weights: `loss_weights` expects list\[float\], got \['1', 'x'\]"):
        parse_config(dpo.Config, ["--loss_type", "sigmoid,ipo", "--loss_weights", "1,x"])
