import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.core import (
    bradley_terry_loss,
    clip_fraction,
    dqn_target,
    dueling_q,
    entropy_from_logits,
    kl_penalty_loss,
    logprobs_from_logits,
    policy_gradient_loss,
    ppo_clip_loss,
    ranking_loss,
    td_loss,
    value_loss,
)

torch.set_num_threads(1)

RATIOS = [1.5, 0.5, 1.1, 0.7]
ADV = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)


def _logps(ratios):
    old = torch.full((len(ratios),), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    return logp, old


def test_ppo_clip_hand_numbers():
    logp, old = _logps(RATIOS)
    loss, m = ppo_clip_loss(logp, old, ADV, clip_eps=0.2)
    # per token: -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert m["policy/clipfrac"].item() == pytest.approx(0.5)
    assert m["policy/ratio_mean"].item() == pytest.approx(sum(RATIOS) / 4)
    assert m["policy/approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in RATIOS) / 4)
    assert not m["loss/policy"].requires_grad
    loss.backward()
    # clipped tokens get no gradient; others d(-rA)/dlogp = -rA / 4
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0])


def test_ppo_asymmetric_clip_and_no_clip():
    logp, old = _logps(RATIOS)
    loss, m = ppo_clip_loss(logp, old, ADV, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 0.8) / 4)
    assert m["policy/clipfrac"].item() == pytest.approx(0.5)
    loss, m = ppo_clip_loss(logp, old, ADV, clip_eps=None)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.1 + 0.7) / 4)
    assert m["policy/clipfrac"].item() == 0.0


def test_ppo_sequence_advantages_broadcast_and_mask():
    torch.manual_seed(0)
    B, T = 3, 5
    logp, old = torch.randn(B, T), torch.randn(B, T)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.randn(B)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        a, _ = ppo_clip_loss(logp, old, adv, mask, mode=mode)
        b, _ = ppo_clip_loss(logp, old, adv[:, None].expand(B, T), mask, mode=mode)
        assert a.item() == pytest.approx(b.item())
    # padding values do not matter
    logp2 = logp.clone()
    logp2[mask == 0] = 50.0
    expected = ppo_clip_loss(logp, old, adv, mask)[0].item()
    assert ppo_clip_loss(logp2, old, adv, mask)[0].item() == pytest.approx(expected)


@pytest.mark.parametrize("clip_eps, clip_eps_high", [(0.2, None), (0.2, 0.28), (0.1, 0.05)])
def test_clip_fraction_vs_loop(clip_eps, clip_eps_high):
    g = torch.Generator().manual_seed(3)
    ratio = torch.exp(0.3 * torch.randn(6, 7, generator=g, dtype=torch.float64))
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio[0, :3] = torch.tensor([1 + high, 1 - clip_eps, 1.0])  # on the edge: not strictly clipped
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    adv[1] = 0.0  # A = 0: both terms equal, never clipped
    mask = (torch.rand(6, 7, generator=g) > 0.3).double()
    hits = n = 0
    for i in range(6):
        for t in range(7):
            if mask[i, t]:  # clipped: the clipped objective is strictly the smaller one
                r, a = ratio[i, t].item(), adv[i].item()
                hits += max(1 - clip_eps, min(1 + high, r)) * a < r * a
                n += 1
    frac = clip_fraction(ratio, adv, clip_eps, clip_eps_high, mask)
    assert 0 < hits < n and frac.item() == pytest.approx(hits / n)
    logp = torch.log(ratio)  # the loss reports this very number
    _, m = ppo_clip_loss(logp, torch.zeros_like(logp), adv, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    assert m["policy/clipfrac"].item() == frac.item()


def test_kl_penalty_hand_numbers():
    logp, old = _logps([1.5, 0.5])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    k = [0.5 - math.log(1.5), -0.5 - math.log(0.5)]
    loss, m = kl_penalty_loss(logp, old, adv, beta=0.5)
    expected = (-(1.5 * 1 - 0.5 * k[0]) - (0.5 * -2 - 0.5 * k[1])) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["policy/approx_kl"].item() == pytest.approx(sum(k) / 2)
    exact = torch.tensor([0.3, 0.1], dtype=torch.float64)
    loss, m = kl_penalty_loss(logp, old, adv, beta=0.5, kl=exact)
    assert loss.item() == pytest.approx((-(1.5 - 0.15) - (-1.0 - 0.05)) / 2)
    assert m["policy/approx_kl"].item() == pytest.approx(0.2)


def test_kl_penalty_k3_gradient_is_exact_kl_gradient():
    # E_{a ~ old}[grad k3] == grad KL(old || new) for a categorical policy
    torch.manual_seed(1)
    old_logits = torch.randn(5, dtype=torch.float64)
    theta = (old_logits + 0.3 * torch.randn(5, dtype=torch.float64)).requires_grad_(True)
    old_lp = torch.log_softmax(old_logits, -1)
    new_lp = torch.log_softmax(theta, -1)
    p_old = old_lp.exp()
    loss, _ = kl_penalty_loss(new_lp, old_lp, torch.zeros(5, dtype=torch.float64), beta=1.0, mode="token-mean")
    # token-mean is a uniform average; weight by p_old * 5 to get the expectation under old
    expected_k3 = (p_old * (torch.exp(new_lp - old_lp) - 1 - (new_lp - old_lp))).sum()
    exact_kl = (p_old * (old_lp - new_lp)).sum()
    (g1,) = torch.autograd.grad(expected_k3, theta, retain_graph=True)
    (g2,) = torch.autograd.grad(exact_kl, theta)
    assert torch.allclose(g1, g2)
    assert expected_k3.item() == pytest.approx(exact_kl.item())
    assert loss.item() > 0


def test_policy_gradient_loss():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    loss, m = policy_gradient_loss(logp, torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    assert loss.item() == pytest.approx((2.0 + 4.0 - 0.5) / 3)
    assert m["loss/policy"].item() == pytest.approx(loss.item())


def test_value_loss_clipped_hand_numbers():
    v = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    old = torch.tensor([0.5, 2.5, 0.0], dtype=torch.float64)
    ret = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    loss, m = value_loss(v, old, ret, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 1.0) / 3)
    assert m["value/clipfrac"].item() == pytest.approx(2 / 3)
    loss, m = value_loss(v, old, ret)
    assert loss.item() == pytest.approx(0.5)
    assert m["loss/value"].item() == pytest.approx(0.5)


def test_entropy_and_logprobs_vs_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 11) * 5
    logits[0, 0, 0] = 1000.0  # stability
    lsm = torch.log_softmax(logits.double(), -1)
    ent = entropy_from_logits(logits)
    assert ent.shape == (2, 3) and torch.all(torch.isfinite(ent))
    assert torch.allclose(ent.double(), -(lsm.exp() * lsm).sum(-1), atol=1e-5)
    labels = torch.randint(0, 11, (2, 3))
    lp = logprobs_from_logits(logits, labels)
    assert torch.allclose(lp.double(), lsm.gather(-1, labels[..., None]).squeeze(-1), atol=1e-5)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_dqn_and_double_dqn_targets_vs_loop():
    torch.manual_seed(3)
    B, A = 6, 4
    r, qt, qo = torch.randn(B), torch.randn(B, A), torch.randn(B, A)
    term = torch.tensor([0, 1, 0, 0, 1, 0])
    gam = torch.tensor([0.99, 0.99, 0.9801, 0.99, 0.5, 0.25])  # per-sample gamma**n
    y = dqn_target(r, qt, term, 0.99)
    yd = dqn_target(r, qt, term, gam, next_q_online=qo)
    for i in range(B):
        assert y[i].item() == pytest.approx(r[i].item() + (0.0 if term[i] else 0.99 * max(qt[i].tolist())), abs=1e-6)
        a_star = max(range(A), key=lambda a: qo[i, a].item())
        expected = r[i].item() + (0.0 if term[i] else gam[i].item() * qt[i, a_star].item())
        assert yd[i].item() == pytest.approx(expected, abs=1e-6)
    assert not dqn_target(r, qt.requires_grad_(True), term, 0.99).requires_grad


def test_dueling_formulas():
    v = torch.tensor([[1.0], [2.0]])
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    assert dueling_q(v, a, "mean").tolist() == [[0.0, 1.0, 2.0], [1.0, 1.0, 4.0]]
    assert dueling_q(v, a, "max").tolist() == [[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]
    assert torch.equal(dueling_q(v.squeeze(-1), a), dueling_q(v, a))
    with pytest.raises(ValueError):
        dueling_q(v, a, "min")


def test_td_loss_weights_and_errors():
    q = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    target = torch.tensor([0.5, 4.0, 2.0])
    w = torch.tensor([1.0, 0.5, 0.25])
    loss, td = td_loss(q, target, w, kind="mse")
    assert loss.item() == pytest.approx((1.0 * 0.5 * 0.25 + 0.5 * 0.5 * 9.0 + 0.0) / 3)
    assert td.tolist() == [0.5, 3.0, 0.0] and not td.requires_grad
    loss, td = td_loss(q, target, w, kind="huber")
    # huber(0.5) = 0.125, huber(3) = 3 - 0.5 = 2.5
    assert loss.item() == pytest.approx((0.125 + 0.5 * 2.5) / 3)
    unweighted, _ = td_loss(q, target, kind="huber")
    assert unweighted.item() == pytest.approx((0.125 + 2.5) / 3)
    loss.backward()
    assert q.grad.tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 0.0])  # huber gradient saturates at 1


def test_bradley_terry_equals_ranking_for_two():
    torch.manual_seed(4)
    c, r = torch.randn(8), torch.randn(8)
    bt, mb = bradley_terry_loss(c, r)
    assert bt.item() == pytest.approx(-F.logsigmoid(c - r).mean().item())
    assert mb["reward/accuracy"].item() == pytest.approx((c > r).float().mean().item())
    assert mb["reward/margin"].item() == pytest.approx((c - r).mean().item())
    # put the chosen one in a random column
    flip = torch.rand(8) < 0.5
    scores = torch.stack([torch.where(flip, r, c), torch.where(flip, c, r)], 1)
    ranks = torch.stack([flip.long(), (~flip).long()], 1)
    rk, mr = ranking_loss(scores, ranks)
    assert rk.item() == pytest.approx(bt.item(), rel=1e-6)
    assert mr["reward/accuracy"].item() == pytest.approx(mb["reward/accuracy"].item())
    margin = torch.rand(8)
    assert ranking_loss(scores, ranks, margin=margin)[0].item() == pytest.approx(
        bradley_terry_loss(c, r, margin=margin)[0].item(), rel=1e-6
    )
    assert ranking_loss(scores, ranks, center_coef=0.01)[0].item() == pytest.approx(
        bradley_terry_loss(c, r, center_coef=0.01)[0].item(), rel=1e-6
    )
    assert bradley_terry_loss(c, r, center_coef=0.01)[0].item() == pytest.approx(
        bt.item() + 0.01 * torch.cat([c, r]).pow(2).mean().item(), rel=1e-6
    )


def test_ranking_loss_vs_explicit_pairs_with_ties_and_padding():
    torch.manual_seed(5)
    scores = torch.randn(4, 4, dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 2, 3], [2, 0, 0, 1], [1, 1, 1, 1], [0, 2, 1, -1]])  # ties; all tied; padding
    loss, m = ranking_loss(scores, ranks)
    per_prompt, accs = [], []
    for b in range(4):
        pairs = [
            (i, j)
            for i in range(4)
            for j in range(4)
            if ranks[b, i] >= 0 and ranks[b, j] >= 0 and ranks[b, i] < ranks[b, j]
        ]
        if not pairs:
            continue
        nll = sum(-math.log(1 / (1 + math.exp(-(scores[b, i] - scores[b, j]).item()))) for i, j in pairs)
        per_prompt.append(nll / len(pairs))
        accs.append(sum(scores[b, i] > scores[b, j] for i, j in pairs).item() / len(pairs))
    assert len(per_prompt) == 3  # the all-tied prompt has no pair
    assert loss.item() == pytest.approx(sum(per_prompt) / 3, rel=1e-10)
    assert m["reward/accuracy"].item() == pytest.approx(sum(accs) / 3)
    assert m["reward/pairs"].item() == 6 + 5 + 0 + 3


def test_ranking_loss_plackett_luce_vs_naive_choices():
    torch.manual_seed(6)
    scores = torch.randn(5, 4, dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 2, 3], [3, 0, 2, 1], [2, 0, 0, 1], [1, 1, 1, 1], [0, 2, 1, -1]])  # ties, padding
    loss, m = ranking_loss(scores, ranks, loss_type="plackett_luce", center_coef=0.01)
    per_prompt = []
    for b in range(5):
        s, r = scores[b].tolist(), ranks[b].tolist()
        valid = [i for i in range(4) if r[i] >= 0]
        worst = max(r[i] for i in valid)
        if all(r[i] == worst for i in valid):
            continue  # nothing to choose
        # each response above the worst rank is chosen among itself and everything ranked at or below it
        nll = sum(math.log(sum(math.exp(s[j]) for j in valid if r[j] >= r[i])) - s[i] for i in valid if r[i] < worst)
        per_prompt.append(nll)
    assert len(per_prompt) == 4
    centre = 0.01 * scores[ranks >= 0].pow(2).mean().item()
    assert loss.item() == pytest.approx(sum(per_prompt) / 4 + centre, rel=1e-10)
    assert m["reward/accuracy"].item() == pytest.approx(ranking_loss(scores, ranks)[1]["reward/accuracy"].item())
    # K = 2 without ties: both loss types are the Bradley-Terry loss
    two, two_ranks = scores[:, :2], torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
    assert ranking_loss(two, two_ranks, loss_type="plackett_luce")[0].item() == pytest.approx(
        ranking_loss(two, two_ranks)[0].item(), rel=1e-12)
    with pytest.raises(ValueError, match="loss_type must be pairwise or plackett_luce"):
        ranking_loss(scores, ranks, loss_type="listwise")
    with pytest.raises(ValueError, match="margin"):
        ranking_loss(scores, ranks, margin=0.5, loss_type="plackett_luce")
