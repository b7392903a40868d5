"""scripts/rm_diagnostics.py's SFT log-prob ranking: batched and padded, it must equal each answer scored alone."""

import importlib.util

import pytest
import torch

spec = importlib.util.spec_from_file_location("rm_diagnostics",
                                              __file__.rsplit("/tests/", 1)[0] + "/scripts/rm_diagnostics.py")
diag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diag)


def test_logp_margins_equal_a_per_sequence_reference(tiny_model_dir, tiny_tokenizer):
    from rlhf.models import load_causal_lm

    torch.set_num_threads(1)
    rows = {"pairs": [{"prompt": "17+25=", "chosen": "42", "rejected": "4"},
                      {"prompt": "3+4=", "chosen": "7", "rejected": "107"}]}
    margins = diag.logp_margins(str(tiny_model_dir), rows, batch_size=2)["pairs"]
    model = load_causal_lm(str(tiny_model_dir)).eval()

    def logp(prompt, answer):  # sum of log p(token | tokens before) over the answer and EOS, one sequence alone
        n = len(tiny_tokenizer(prompt)["input_ids"])
        ids = tiny_tokenizer(prompt + answer + tiny_tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(float(logits[t - 1, ids[t]]) for t in range(n, len(ids)))

    expected = [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows["pairs"]]
    assert margins.tolist() == pytest.approx(expected, abs=1e-4)


def test_a_logprob_coef_model_is_split_into_its_two_terms(tmp_path):
    from rlhf import reward
    from rlhf.runtime import make_config

    torch.set_num_threads(1)
    rows = {"pairs": [{"prompt": "17+25=", "chosen": "42", "rejected": "32"},
                      {"prompt": "3+4=", "chosen": "7", "rejected": "8"}]}
    cfg = dict(num_train_prompts=16, num_eval_prompts=0, progress=False, report_to="none", max_steps=1,
               per_device_train_batch_size=4)
    reward.train(make_config(reward.Config, dict(cfg, output_dir=str(tmp_path / "plain"))))
    assert diag.head_margins(str(tmp_path / "plain" / "model"), rows) is None  # the score head is the whole score
    reward.train(make_config(reward.Config, dict(cfg, output_dir=str(tmp_path / "lp"), logprob_coef=0.5)))
    model_dir = str(tmp_path / "lp" / "model")
    total, head = diag.rm_margins(model_dir, rows)["pairs"], diag.head_margins(model_dir, rows)["pairs"]
    # the rest is 0.5 x the model's own log-prob margin: that of the same weights loaded as a causal LM
    assert (total - head).tolist() == pytest.approx((0.5 * diag.logp_margins(model_dir, rows)["pairs"]).tolist(),
                                                    abs=1e-4)
