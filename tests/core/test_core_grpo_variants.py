"""The GRPO / PPO variants of rlhf.core against naive loops: RLOO, ReMax, REINFORCE++, GSPO, DAPO's filter and
overlong penalty."""

import math

import pytest
import torch

from rlhf.core import (baseline_advantages, informative_groups, overlong_penalty, ppo_clip_loss,
                       reinforce_pp_advantages, rloo_advantages, sequence_log_ratio)

torch.set_num_threads(1)


def test_rloo_is_the_leave_one_out_baseline():
    torch.manual_seed(0)
    G = 4
    rewards = torch.randn(3 * G, dtype=torch.float64)
    valid = torch.ones(3 * G, dtype=torch.bool)
    valid[[1, 8, 9, 10]] = False  # group 2 keeps one valid entry: nothing to compare with
    got = rloo_advantages(rewards, G, valid)
    for i in range(3 * G):
        g = i // G
        others = [float(rewards[j]) for j in range(g * G, g * G + G) if j != i and valid[j]]
        want = float(rewards[i]) - sum(others) / len(others) if valid[i] and others else 0.0
        assert float(got[i]) == pytest.approx(want, abs=1e-12), i
    assert torch.equal(rloo_advantages(rewards, G), rloo_advantages(rewards, G, torch.ones_like(valid)))


def test_remax_baseline_is_subtracted_per_prompt():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.0])
    greedy = torch.tensor([0.5, 1.0, 0.0])
    got = baseline_advantages(rewards, greedy, 2, valid=torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
                              baseline_valid=torch.tensor([True, True, False]))
    want = [rewards[i] - greedy[i // 2] if (i != 3 and i // 2 != 2) else 0.0 for i in range(6)]
    assert got.tolist() == pytest.approx([float(w) for w in want])


def test_reinforce_pp_whitens_the_kl_penalised_return_to_go():
    torch.manual_seed(1)
    B, T, beta = 4, 5, 0.1
    scores, kl = torch.randn(B, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    lengths = [5, 3, 1, 4]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    got = reinforce_pp_advantages(scores, kl, mask, beta)
    returns = []  # naive: per row, G_t = score - beta * sum_{s >= t} kl_s
    for b, n in enumerate(lengths):
        returns.append([float(scores[b]) - beta * sum(float(kl[b, s]) for s in range(t, n)) for t in range(n)])
    flat = [g for row in returns for g in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((g - mean) ** 2 for g in flat) / (len(flat) - 1))
    for b, n in enumerate(lengths):
        assert got[b, :n].tolist() == pytest.approx([(g - mean) / std for g in returns[b]], abs=1e-6)
        assert got[b, n:].abs().sum() == 0


def naive_gspo(logp, old_logp, adv, mask, eps_low, eps_high):
    """Sequence-level GSPO objective by a loop: s_i = exp(mean_t log ratio), clipped per sequence."""
    total = 0.0
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t]]
        s = torch.exp(sum(logp[i, t] - old_logp[i, t] for t in toks) / len(toks))
        total = total - torch.minimum(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i])
    return total / logp.shape[0]


@pytest.mark.parametrize("shift", [0.0, 0.15, -0.4])
def test_gspo_sequence_ratio_matches_the_sequence_objective_and_its_gradient(shift):
    torch.manual_seed(3)
    B, T = 4, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    old_logp = -torch.rand(B, T, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    base = old_logp + shift + 0.3 * torch.randn(B, T, dtype=torch.float64)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, m = ppo_clip_loss(a, old_logp, adv, mask, 0.2, 0.28, mode="seq-mean-token-mean", level="sequence")
    want = naive_gspo(b, old_logp, adv, mask, 0.2, 0.28)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-10)
    loss.backward()
    want.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-10)
    ratio = torch.exp(sequence_log_ratio(base, old_logp, mask))
    for i in range(B):  # one ratio per sequence
        n = int(mask[i].sum())
        assert torch.allclose(ratio[i, :n], ratio[i, 0].expand(n))
    assert 0 <= float(m["policy/clipfrac"]) <= 1


def test_gspo_equals_token_level_when_every_sequence_has_one_token():
    torch.manual_seed(4)
    logp, old_logp, adv = torch.randn(6, 1), torch.randn(6, 1), torch.randn(6)
    tok, _ = ppo_clip_loss(logp, old_logp, adv, torch.ones(6, 1), 0.2, level="token")
    seq, _ = ppo_clip_loss(logp, old_logp, adv, torch.ones(6, 1), 0.2, level="sequence")
    assert float(tok) == pytest.approx(float(seq), abs=1e-6)
    with pytest.raises(ValueError, match="importance-sampling level"):
        ppo_clip_loss(logp, old_logp, adv, level="group")


def test_informative_groups_vs_loop():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.2, 7.0, 7.0, 3.0])
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]).bool()
    got = informative_groups(rewards, 3, valid).tolist()
    want = []
    for g in range(4):
        vals = {float(rewards[j]) for j in range(3 * g, 3 * g + 3) if valid[j]}
        want.append(len(vals) > 1)
    assert got == want == [False, False, True, False]


def test_overlong_penalty_is_dapo_eq_13():
    L_max, L_cache = 10, 4
    lengths = torch.arange(0, 13)

    def naive(n):
        if n <= L_max - L_cache:
            return 0.0
        if n <= L_max:
            return ((L_max - L_cache) - n) / L_cache
        return -1.0
    assert overlong_penalty(lengths, L_max, L_cache, 0.5).tolist() == pytest.approx(
        [0.5 * naive(int(n)) for n in lengths])
    assert overlong_penalty(lengths, L_max, 0).abs().sum() == 0
