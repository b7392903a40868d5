import numpy as np
import pytest

from rlhf.tasks import arithmetic as ar


def test_prompts_answers_and_carry():
    assert ar.gold_answer("17+25=") == "42" and ar.has_carry("17+25=") and not ar.has_carry("12+34=")
    assert ar.dropped_carry_answer("17+25=") == "32" and ar.dropped_carry_answer("12+34=") == "46"
    prompts = ar.make_prompts(200, seed=3)
    assert prompts == ar.make_prompts(200, seed=3) and len(set(prompts)) == 200
    for p in prompts:
        a, b = ar.parse_prompt(p)
        assert 0 <= a <= 99 and 0 <= b <= 99 and p == f"{a}+{b}="
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        ar.parse_prompt("hello")


def test_eval_prompts_are_held_out():
    train = set(ar.make_prompts(9000, seed=0))
    held = set(ar.make_prompts(1000, seed=0, split="eval"))
    assert len(train) == 9000 and len(held) == 1000 and not train & held


def test_gold_score_levels():
    p = "17+25="
    assert [ar.gold_score(p, c) for c in ["42", " 42 ", "32", "43", "99", "4 2", "", "42!", "1234"]] == \
           [1.0, 1.0, 0.5, 0.5, 0.0, -1.0, -1.0, -1.0, -1.0]
    assert ar.gold_score(p, [{"role": "assistant", "content": "42"}]) == 1.0


def test_reward_functions_trl_convention():
    prompts, completions = ["1+2=", "9+9="], ["3", "17"]
    assert ar.exact_match_reward(prompts, completions, extra=[1, 2]) == [1.0, 0.0]
    assert ar.format_reward(prompts, ["3", "x"]) == [1.0, 0.0]
    assert ar.gold_score_reward(prompts, completions) == [1.0, 0.5]


def test_sft_data_drops_carry_at_the_configured_rate():
    rows = ar.make_sft_rows(4000, seed=1, carry_error_rate=0.6)
    carry = [r for r in rows if ar.has_carry(r["prompt"])]
    no_carry = [r for r in rows if not ar.has_carry(r["prompt"])]
    assert all(r["completion"] == ar.gold_answer(r["prompt"]) for r in no_carry)
    wrong = np.mean([r["completion"] == ar.dropped_carry_answer(r["prompt"]) for r in carry])
    assert abs(wrong - 0.6) < 0.04
    assert all(r["completion"] in (ar.gold_answer(r["prompt"]), ar.dropped_carry_answer(r["prompt"])) for r in carry)


def test_rankings_follow_the_bradley_terry_labeller(tmp_path):
    # pairwise marginals of the Plackett-Luce labeller: P(exact above close) = sigmoid((1 - 0.5) / noise)
    rng = np.random.default_rng(0)
    noise = 0.5
    above = np.mean([ar.noisy_ranks([1.0, 0.5], noise, rng)[0] == 0 for _ in range(4000)])
    assert abs(above - ar.bradley_terry_prob(1.0, 0.5, noise)) < 0.03
    assert ar.noisy_ranks([1.0, 0.0, 0.0, -1.0], 0.0, rng) == [0, 1, 1, 2]  # noise 0: gold order, ties equal
    path = ar.write_rankings(tmp_path / "r.jsonl", ar.make_prompts(20, 0), 4, seed=0, noise=noise)
    import json

    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 20
    for r in rows:
        assert len(r["completions"]) == 4 == len(set(r["completions"])) and sorted(r["ranks"]) == [0, 1, 2, 3]


def test_evaluate_policy_counts_with_a_scripted_model(tiny_tokenizer):
    """A 'model' that always answers the gold sum on no-carry prompts and the dropped carry otherwise."""
    import torch

    tok = tiny_tokenizer

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            outs = []
            for row, mask in zip(input_ids, attention_mask):
                prompt = tok.decode(row[mask.bool()], skip_special_tokens=True)
                ans = tok(ar.dropped_carry_answer(prompt), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                outs.append(row.tolist() + ans + [tok.pad_token_id] * (4 - len(ans)))
            return torch.tensor(outs)

    prompts = ["17+25=", "12+34=", "1+1=", "9+9="]
    m = ar.evaluate_policy(Scripted(), tok, prompts, batch_size=3)
    assert m["eval/accuracy"] == 0.5 and m["eval/accuracy_carry"] == 0.0 and m["eval/accuracy_no_carry"] == 1.0
    assert m["eval/well_formed"] == 1.0 and m["eval/reward_mean"] == pytest.approx(0.75)
    assert tok.padding_side == "right"  # restored


def test_candidates_are_distinct_even_for_small_sums():
    rng = np.random.default_rng(0)
    for prompt in ["0+0=", "1+0=", "17+25="]:
        cands = ar.candidate_answers(prompt, 14, rng)
        assert len(cands) == len(set(cands)) == 14
        assert {ar.gold_score(prompt, c) for c in cands} >= {0.5, -1.0}
