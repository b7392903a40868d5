"""DPO-family losses against naive references: Python loops over prompts and pairs, math.* closed forms."""

import itertools
import math

import pytest
import torch

from rlhf.core import (best_response_nll, dpo_loss, implicit_rewards, length_desensitised_logps, log_sum_sq_probs,
                       pair_losses, plackett_luce_nll, ranked_pairs, wpo_weights)
from rlhf.core.preference import PAIR_LOSSES, SMOOTHED

torch.set_num_threads(1)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sig(x):
    return math.exp(_logsig(x))


def naive_pair_loss(rb, rw, loss_type, beta, eps, gamma, tau=0.05):
    """The pair's loss from its rewards r_b (better) and r_w (worse), as each paper writes it."""
    d = rb - rw
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -(1 - eps) * _logsig(d) - eps * _logsig(-d)
    if loss_type == "robust":
        return ((1 - eps) * -_logsig(d) - eps * -_logsig(-d)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (d / beta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - d)
    if loss_type == "simpo":
        return -(1 - eps) * _logsig(d - gamma) - eps * _logsig(gamma - d)
    if loss_type == "exo_pair":  # KL of the policy's pair distribution from the smoothed labels (1 - eps, eps)
        q = _sig(d)
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    if loss_type == "nca_pair":
        return -_logsig(rb) - 0.5 * _logsig(-rb) - 0.5 * _logsig(-rw)
    if loss_type == "bco_pair":
        return -_logsig(rb) - _logsig(-rw)
    if loss_type == "sppo_hard":  # log-ratios pushed to +-1 / (2 beta)
        return (rb / beta - 0.5 / beta) ** 2 + (rw / beta + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - _sig(rb)) + _sig(rw)
    if loss_type == "apo_down":
        return _sig(rb) + (1 - _sig(d))
    if loss_type == "discopop":
        m = _sig(d / tau)
        return (1 - m) * -_logsig(d) + m * math.exp(-d)
    raise AssertionError(loss_type)


def naive_f_score(u, f, alpha=0.5):
    """f'(pi / pi_ref) at log-ratio u (f-DPO, Table 1; forward KL and JS shifted to 0 at u = 0), alpha in TRL's
    parameterisation: the paper's (1 - ratio^(-a)) / a with a = 1 - alpha."""
    if f == "reverse_kl":
        return u
    if f == "forward_kl":
        return 1 - 1 / math.exp(u)
    if f == "js_divergence":
        ratio = math.exp(u)
        return math.log(2 * ratio / (1 + ratio))
    a = 1 - alpha
    return (1 - math.exp(u) ** -a) / a


def naive_dpo(logps, ref_logps, ranks, beta, loss_type, eps=0.0, gamma=0.5, f="reverse_kl"):
    """Loop: per prompt, mean over pairs (i better than j) of the pair loss; mean over prompts with a pair."""
    per_prompt, acc = [], []
    for b in range(len(ranks)):
        losses, right = [], []
        for i, j in itertools.permutations(range(len(ranks[b])), 2):
            if ranks[b][i] < 0 or ranks[b][j] < 0 or not ranks[b][i] < ranks[b][j]:
                continue
            ri = beta * naive_f_score(logps[b][i] - (ref_logps[b][i] if ref_logps is not None else 0.0), f)
            rj = beta * naive_f_score(logps[b][j] - (ref_logps[b][j] if ref_logps is not None else 0.0), f)
            losses.append(naive_pair_loss(ri, rj, loss_type, beta, eps, gamma))
            right.append(float(ri > rj))
        if losses:
            per_prompt.append(sum(losses) / len(losses))
            acc.append(sum(right) / len(right))
    return sum(per_prompt) / len(per_prompt), sum(acc) / len(acc)


def naive_plackett_luce(rewards, order):
    """-log P(order) for a strict order (best first): the product of successive softmax choices."""
    nll = 0.0
    for k in range(len(order)):
        rest = [rewards[j] for j in order[k:]]
        nll -= rewards[order[k]] - math.log(sum(math.exp(r) for r in rest))
    return nll


RANKS = [[0, 1, 2, -1], [2, 0, 1, 1], [0, 0, 1, 3], [1, 1, 1, 1]]  # padding, a tie, K = 3 / 4, all tied


@pytest.mark.parametrize(("loss_type", "eps"), [(t, eps) for t in PAIR_LOSSES for eps in (
    (1e-3, 0.2) if t == "exo_pair" else (0.0, 0.2) if t in SMOOTHED else (0.0,))])  # EXO needs eps > 0
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_loss_matches_loops(loss_type, eps, reference_free):
    g = torch.Generator().manual_seed(0)
    logps = -5 * torch.rand(4, 4, generator=g, dtype=torch.float64)
    ref = None if reference_free else -5 * torch.rand(4, 4, generator=g, dtype=torch.float64)
    ranks = torch.tensor(RANKS)
    loss, m = dpo_loss(logps, ref, ranks, beta=0.7, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.3)
    want, want_acc = naive_dpo(logps.tolist(), None if ref is None else ref.tolist(), RANKS, 0.7, loss_type, eps, 0.3)
    assert math.isclose(float(loss), want, rel_tol=1e-10)
    assert math.isclose(float(m["rewards/accuracies"]), want_acc, rel_tol=1e-10)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "discopop"])
def test_f_dpo_rewards_match_loops(f, loss_type):
    """f-DPO: each response's reward beta * f'(pi / pi_ref), the loss on their differences, against the loop."""
    g = torch.Generator().manual_seed(2)
    logps, ref = (-5 * torch.rand(4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    loss, m = dpo_loss(logps, ref, torch.tensor(RANKS), beta=0.7, loss_type=loss_type, f_divergence=f)
    want, want_acc = naive_dpo(logps.tolist(), ref.tolist(), RANKS, 0.7, loss_type, f=f)
    assert math.isclose(float(loss), want, rel_tol=1e-10)
    assert math.isclose(float(m["rewards/accuracies"]), want_acc, rel_tol=1e-10)


def test_f_divergence_rewards_limits_and_errors():
    u = torch.tensor([-300.0, -2.0, 0.0, 1.5, 300.0])
    zero = torch.zeros(5)
    for f in ("forward_kl", "js_divergence", "alpha_divergence"):
        r = implicit_rewards(u, zero, beta=1.0, f_divergence=f)
        assert torch.isfinite(r).all() and r[2] == 0 and (r.diff() > 0).all(), f  # 0 at pi = pi_ref, rising
    # alpha_divergence tends to reverse KL as alpha -> 1, and is it at 1
    near = implicit_rewards(u[1:4], zero[1:4], f_divergence="alpha_divergence", alpha=1 - 1e-7)
    assert torch.allclose(near, 0.1 * u[1:4], atol=1e-6)
    assert torch.equal(implicit_rewards(u, zero, f_divergence="alpha_divergence", alpha=1.0), 0.1 * u)
    with pytest.raises(ValueError, match="reward differences"):
        dpo_loss(u.view(1, 5), zero.view(1, 5), torch.tensor([[0, 1, 2, 3, 4]]), loss_type="nca_pair",
                 f_divergence="js_divergence")
    with pytest.raises(ValueError, match="needs a reference"):
        implicit_rewards(u, None, f_divergence="forward_kl")


def naive_ld(tokens_i, tokens_j, alpha):
    """LD-DPO: response i's log-prob against j, its first min(len_i, len_j) tokens in full, the rest times alpha."""
    shared = min(len(tokens_i), len(tokens_j))
    return sum(tokens_i[:shared]) + alpha * sum(tokens_i[shared:])


LENGTHS = [[6, 1, 3, 3], [0, 2, 5, 4], [4, 4, 1, 6], [2, 5, 3, 0]]  # 0: a padding response


def _token_logps(g, lengths, r=6):
    """Random token log-probs of responses of these lengths, as lists and as (B, K, R) tensors with their mask
    (garbage past each response, as the model's log-probs there)."""
    lists = [[(-3 * torch.rand(n, generator=g, dtype=torch.float64)).tolist() for n in row] for row in lengths]
    tensor = torch.randn(len(lengths), len(lengths[0]), r, generator=g, dtype=torch.float64)
    mask = torch.zeros_like(tensor)
    for b, row in enumerate(lists):
        for k, tokens in enumerate(row):
            tensor[b, k, :len(tokens)], mask[b, k, :len(tokens)] = torch.tensor(tokens, dtype=torch.float64), 1
    return lists, tensor, mask


def test_length_desensitised_logps_match_a_loop():
    lists, tokens, mask = _token_logps(torch.Generator().manual_seed(3), LENGTHS)
    got = length_desensitised_logps(tokens, mask, 0.3)
    for b, i, j in itertools.product(range(4), repeat=3):
        assert math.isclose(float(got[b, i, j]), naive_ld(lists[b][i], lists[b][j], 0.3), abs_tol=1e-12)
    plain = (tokens * mask).sum(-1)
    assert torch.allclose(got.diagonal(dim1=1, dim2=2), plain)  # against itself nothing is cut
    assert torch.allclose(length_desensitised_logps(tokens, mask, 1.0), plain.unsqueeze(2).expand(-1, -1, 4))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "bco_pair", "sppo_hard"])
def test_ld_dpo_loss_matches_loops(loss_type):
    """dpo_loss on LD-DPO's per-pair log-probs of the policy and the reference: each pair's loss from the
    log-probs cut at its own shared length, K-wise with ties and padding, against the loop."""
    g = torch.Generator().manual_seed(4)
    (lp, tp, mask), (lr, tr, _) = _token_logps(g, LENGTHS), _token_logps(g, LENGTHS)
    ranks, beta, per_prompt = [[0, 1, 2, 3], [-1, 0, 1, 1], [0, 0, 1, 3], [1, 0, 2, -1]], 0.7, []
    for b in range(4):
        r = [[beta * (naive_ld(lp[b][i], lp[b][j], 0.4) - naive_ld(lr[b][i], lr[b][j], 0.4)) for j in range(4)]
             for i in range(4)]  # r[i][j]: response i's reward in its pair with j
        losses = [naive_pair_loss(r[i][j], r[j][i], loss_type, beta, 0.0, 0.5)
                  for i, j in itertools.permutations(range(4), 2) if 0 <= ranks[b][i] < ranks[b][j]]
        per_prompt.append(sum(losses) / len(losses))
    loss, _ = dpo_loss(length_desensitised_logps(tp, mask, 0.4), length_desensitised_logps(tr, mask, 0.4),
                       torch.tensor(ranks), beta=beta, loss_type=loss_type)
    assert math.isclose(float(loss), sum(per_prompt) / 4, rel_tol=1e-10)
    with pytest.raises(ValueError, match="plackett_luce ranks whole lists"):
        dpo_loss(length_desensitised_logps(tp, mask, 0.4), None, torch.tensor(ranks), loss_type="plackett_luce")


def test_wpo_weights_match_a_loop():
    """exp(mean over a response's tokens of log p(y_t) - log sum_v p(v)^2), from the softmax written out; detached."""
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(2, 3, 4, 7, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 7, (2, 3, 4), generator=g)
    lengths = [[4, 1, 0], [2, 3, 4]]
    mask = torch.tensor([[[1.0] * n + [0.0] * (4 - n) for n in row] for row in lengths], dtype=torch.float64)
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = wpo_weights(token_logps, log_sum_sq_probs(logits).double(), mask)
    assert not got.requires_grad
    for b, k in itertools.product(range(2), range(3)):
        terms = []
        for t in range(lengths[b][k]):
            p = [math.exp(z) for z in logits[b, k, t].tolist()]
            p = [x / sum(p) for x in p]
            terms.append(math.log(p[int(labels[b, k, t])]) - math.log(sum(x * x for x in p)))
        want = math.exp(sum(terms) / len(terms)) if terms else 1.0
        assert math.isclose(float(got[b, k]), want, rel_tol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_wpo_weighs_each_pair_by_its_two_responses(loss_type):
    g = torch.Generator().manual_seed(6)
    logps, ref = (-5 * torch.rand(4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(4, 4, generator=g, dtype=torch.float64)
    loss, _ = dpo_loss(logps, ref, torch.tensor(RANKS), beta=0.7, loss_type=loss_type, weights=w)
    per_prompt = []
    for b in range(4):
        losses = [w[b, i] * w[b, j] * naive_pair_loss(0.7 * float(logps[b, i] - ref[b, i]),
                                                      0.7 * float(logps[b, j] - ref[b, j]), loss_type, 0.7, 0.0, 0.5)
                  for i, j in itertools.permutations(range(4), 2) if 0 <= RANKS[b][i] < RANKS[b][j]]
        if losses:
            per_prompt.append(sum(losses) / len(losses))
    assert math.isclose(float(loss), float(sum(per_prompt) / len(per_prompt)), rel_tol=1e-10)
    with pytest.raises(ValueError, match="no pair weights"):
        dpo_loss(logps, ref, torch.tensor(RANKS), loss_type="plackett_luce", weights=w)


def test_pairwise_dpo_is_the_paper_loss_and_metrics():
    """K = 2: -log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over pairs; TRL's metrics."""
    pc, pr = torch.tensor([-3.0, -2.0, -7.0]), torch.tensor([-4.0, -1.0, -6.5])
    rc, rr = torch.tensor([-3.5, -2.5, -6.0]), torch.tensor([-3.0, -1.5, -6.0])
    beta = 0.5
    loss, m = dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.tensor([[0, 1]] * 3), beta=beta)
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(beta * h).mean())
    assert torch.allclose(m["rewards/chosen"], (beta * (pc - rc)).mean())
    assert torch.allclose(m["rewards/rejected"], (beta * (pr - rr)).mean())
    assert torch.allclose(m["rewards/margins"], (beta * h).mean())
    assert torch.allclose(m["rewards/accuracies"], (h > 0).float().mean())
    assert torch.allclose(m["logps/chosen"], pc.mean()) and torch.allclose(m["logps/rejected"], pr.mean())


def test_robust_without_smoothing_is_sigmoid_and_ipo_is_minimal_at_its_target():
    d = torch.linspace(-3, 3, 7)
    zero = torch.zeros_like(d)
    assert torch.allclose(pair_losses(d, zero, "robust"), pair_losses(d, zero, "sigmoid"))
    beta = 0.25
    assert float(pair_losses(torch.tensor(0.5), torch.tensor(0.0), "ipo", beta=beta)) == 0.0  # h = 1 / (2 beta)
    # SPPO's minimum: each log-ratio at its target, +-1 / (2 beta)
    assert float(pair_losses(torch.tensor(0.5), torch.tensor(-0.5), "sppo_hard", beta=beta)) == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        pair_losses(d, zero, "nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        pair_losses(d, zero, "exo_pair")


def test_discopop_stays_finite_on_pairs_ordered_far_wrong():
    """Its exponential term exp(-d) overflows float32 at d < -88, where its weight sigma(d / tau) underflows: the
    product is computed in logs, so the loss and gradient stay finite (and the loss equals the formula)."""
    d = torch.tensor([-200.0, -30.0, 0.0, 30.0], requires_grad=True)
    loss = pair_losses(d, torch.zeros(4), "discopop")
    loss.sum().backward()
    loss = loss.detach()
    assert torch.isfinite(loss).all() and torch.isfinite(d.grad).all()
    for x, got in zip(d.tolist()[1:], loss.tolist()[1:]):
        assert got == pytest.approx(naive_pair_loss(x, 0.0, "discopop", 0.1, 0.0, 0.5), rel=1e-5)
    assert float(loss[0]) == pytest.approx(200.0, rel=1e-6)  # -log sigma(d) ~ -d there


def test_plackett_luce_strict_orders_match_the_product_formula():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ranks = torch.stack([torch.randperm(4, generator=g) for _ in range(6)])
    got = plackett_luce_nll(rewards, ranks)
    for b in range(6):
        order = sorted(range(4), key=lambda i: int(ranks[b, i]))
        assert math.isclose(float(got[b]), naive_plackett_luce(rewards[b].tolist(), order), rel_tol=1e-10)


def test_plackett_luce_ties_padding_and_k2():
    r = [0.3, -1.0, 2.0, 0.5]
    # ranks 0, 1, 1, 2: the tied pair each competes against {1, 2, 3}; the worst adds nothing (Breslow)
    ex = lambda i, js: math.log(sum(math.exp(r[j]) for j in js)) - r[i]  # noqa: E731
    want = ex(0, [0, 1, 2, 3]) + ex(1, [1, 2, 3]) + ex(2, [1, 2, 3])
    got = plackett_luce_nll(torch.tensor([r], dtype=torch.float64), torch.tensor([[0, 1, 1, 2]]))
    assert math.isclose(float(got[0]), want, rel_tol=1e-10)
    # padding (rank -1) is ignored: the same as the 3-response prompt
    pad = plackett_luce_nll(torch.tensor([[0.3, 7.0, -1.0, 2.0]], dtype=torch.float64), torch.tensor([[0, -1, 1, 2]]))
    strict = plackett_luce_nll(torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64), torch.tensor([[0, 1, 2]]))
    assert torch.allclose(pad, strict)
    # K = 2: the DPO (sigmoid) loss
    logps, ref, ranks = torch.tensor([[-1.0, -2.0], [-3.0, -1.5]]), torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0]])
    pl, _ = dpo_loss(logps, ref, ranks, beta=0.3, loss_type="plackett_luce")
    sig, _ = dpo_loss(logps, ref, ranks, beta=0.3, loss_type="sigmoid")
    assert torch.allclose(pl, sig)


def test_ranked_pairs_skip_ties_and_padding():
    pairs = ranked_pairs(torch.tensor([[0, 1, 1, -1]]))[0]
    assert sorted(map(tuple, pairs.nonzero().tolist())) == [(0, 1), (0, 2)]


def test_best_response_nll_matches_a_loop():
    """RPO's term: per prompt minus the mean per-token log-prob of its best-ranked responses (ties averaged),
    then the mean over prompts that have a pair (all tied or padded: no weight)."""
    token_logps = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -0.7, -0.9], [-1.1, -1.2, 9.0], [-4.0, -4.0, 0.0]],
                               dtype=torch.float64)
    ranks = torch.tensor([[1, 0, 2], [0, 0, 1], [-1, 1, -1], [0, 0, -1]])  # ties; a padded best; all tied
    expected = []
    for b in range(len(ranks)):
        real = [k for k in range(3) if ranks[b][k] >= 0]
        if len({int(ranks[b][k]) for k in real}) < 2:
            continue  # no strict pair: the loss skips the prompt
        top = min(int(ranks[b][k]) for k in real)
        best = [float(token_logps[b][k]) for k in real if ranks[b][k] == top]
        expected.append(-sum(best) / len(best))
    assert expected == [1.0, 0.5]
    assert float(best_response_nll(token_logps, ranks)) == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert float(best_response_nll(token_logps[2:], ranks[2:])) == 0.0
