import pytest
import torch

from rlhf.core import discounted_returns, gae, group_advantages, group_stats, per_token_rewards, token_gae

torch.set_num_threads(1)


def ref_gae(r, v, nv, term, end, gamma, lam):
    """Naive loop over python floats, for a single env."""
    T = len(r)
    adv = [0.0] * T
    nxt = 0.0
    for t in reversed(range(T)):
        delta = r[t] + gamma * (1 - term[t]) * nv[t] - v[t]
        nxt = delta + gamma * lam * (1 - end[t]) * nxt
        adv[t] = nxt
    return adv


def test_gae_hand_rollout_with_truncation_and_termination():
    # step 2 truncated (bootstraps from the final obs value 4.0), step 3 terminated
    # (its next value 100 is ignored), step 4 unfinished (bootstraps from 0.7).
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    values = torch.tensor([0.5, 1.0, 1.5, 0.2, 0.3], dtype=torch.float64)
    next_values = torch.tensor([1.0, 1.5, 4.0, 100.0, 0.7], dtype=torch.float64)
    terminated = torch.tensor([0, 0, 0, 1, 0])
    episode_end = torch.tensor([0, 0, 1, 1, 0])
    adv, ret = gae(rewards, values, next_values, terminated, episode_end, gamma=0.9, lam=0.8)
    expected = [1.4 + 0.72 * 3.302, 0.35 + 0.72 * 4.1, 4.1, 0.8, 0.83]
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)
    assert ret.tolist() == pytest.approx([a + v for a, v in zip(expected, values.tolist())], abs=1e-12)


def test_gae_vectorised_envs_match_loop():
    torch.manual_seed(0)
    T, N = 7, 3
    r, v, nv = torch.randn(T, N), torch.randn(T, N), torch.randn(T, N)
    term = (torch.rand(T, N) < 0.2).float()
    end = torch.maximum(term, (torch.rand(T, N) < 0.2).float())
    adv, ret = gae(r, v, nv, term, end, gamma=0.99, lam=0.95)
    assert adv.shape == ret.shape == (T, N)
    for n in range(N):
        ref = ref_gae(r[:, n].tolist(), v[:, n].tolist(), nv[:, n].tolist(), term[:, n].tolist(), end[:, n].tolist(),
                      0.99, 0.95)
        assert adv[:, n].tolist() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(ret, adv + v)


def test_gae_lambda_one_equals_discounted_returns():
    torch.manual_seed(1)
    T = 6
    r, v = torch.randn(T, dtype=torch.float64), torch.randn(T, dtype=torch.float64)
    end = torch.tensor([0, 0, 1, 0, 0, 0])
    nv = torch.cat([v[1:], torch.tensor([0.3], dtype=torch.float64)])
    _, ret = gae(r, v, nv, end, end, gamma=0.9, lam=1.0)
    mc = discounted_returns(r, end, 0.9, bootstrap=torch.tensor(0.3, dtype=torch.float64))
    assert torch.allclose(ret, mc)


def test_discounted_returns_hand():
    r = torch.tensor([1.0, 2.0, 3.0])
    g = discounted_returns(r, torch.tensor([0, 1, 0]), 0.5, bootstrap=torch.tensor(10.0))
    assert g.tolist() == pytest.approx([2.0, 2.0, 8.0])
    assert discounted_returns(r, torch.zeros(3), 0.5).tolist() == pytest.approx([1 + 1 + 0.75, 2 + 1.5, 3.0])
    g2 = discounted_returns(torch.ones(2, 2), torch.zeros(2, 2), 0.5, bootstrap=torch.tensor([0.0, 4.0]))
    assert g2.tolist() == [[1.5, 2.5], [1.0, 3.0]]


def test_token_gae_matches_per_row_loop_and_zeroes_padding():
    torch.manual_seed(2)
    B, T = 3, 6
    lengths = [6, 2, 4]
    mask = torch.tensor([[1] * L + [0] * (T - L) for L in lengths])
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)  # garbage on padding
    adv, ret = token_gae(r, v, mask, gamma=0.95, lam=0.9)
    for b, L in enumerate(lengths):
        vals = v[b, :L].tolist()
        nv = vals[1:] + [0.0]
        done = [0] * (L - 1) + [1]
        ref = ref_gae(r[b, :L].tolist(), vals, nv, done, done, 0.95, 0.9)
        assert adv[b, :L].tolist() == pytest.approx(ref, abs=1e-12)
        assert ret[b, :L].tolist() == pytest.approx([a + x for a, x in zip(ref, vals)], abs=1e-12)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_per_token_rewards_match_a_loop():
    """r_t = -beta KL_t on every completion token, the score added on the last one; padding and empty rows get 0."""
    torch.manual_seed(0)
    kl = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    scores, beta = torch.tensor([2.0, -1.0, 0.5, 3.0]), 0.3
    expected = torch.zeros(4, 5)
    for b in range(4):
        length = int(mask[b].sum())
        for t in range(length):
            expected[b, t] = -beta * kl[b, t] + (scores[b] if t == length - 1 else 0.0)
    assert torch.allclose(per_token_rewards(scores, kl, mask, beta), expected, atol=1e-6)
    hand = per_token_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.1, 9.0]]),
                             torch.tensor([[1, 1, 1], [1, 1, 0]]), beta=0.5)
    assert torch.allclose(hand, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25, 0.05 - 1.0, 0.0]]))


def test_group_advantages_vs_loop():
    torch.manual_seed(3)
    G = 4
    r = torch.randn(3 * G, dtype=torch.float64)
    r[G : 2 * G] = 1.0  # a constant group: advantage 0, no NaN
    out = {s: group_advantages(r, G, scale=s) for s in ("group", "batch", "none")}
    batch_std = r.std().item()
    for g in range(3):
        grp = r[g * G : (g + 1) * G].tolist()
        mean = sum(grp) / G
        std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5
        for i, x in enumerate(grp):
            k = g * G + i
            assert out["group"][k].item() == pytest.approx((x - mean) / (std + 1e-4), abs=1e-9)
            assert out["batch"][k].item() == pytest.approx((x - mean) / (batch_std + 1e-4), abs=1e-9)
            assert out["none"][k].item() == pytest.approx(x - mean, abs=1e-12)
    assert torch.all(out["group"][G : 2 * G] == 0)
    assert torch.all(group_advantages(r, 1) == 0)


def ref_group_advantages(r, valid, G, scale, eps=1e-4):
    """Python loop over groups, using only the valid entries; invalid ones get 0."""
    def stats(xs):
        n = len(xs)
        mean = sum(xs) / n if n else 0.0
        std = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
        return mean, std

    _, batch_std = stats([x for x, v in zip(r, valid) if v])
    out = []
    for g in range(len(r) // G):
        xs, vs = r[g * G:(g + 1) * G], valid[g * G:(g + 1) * G]
        mean, std = stats([x for x, v in zip(xs, vs) if v])
        div = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(x - mean) / div if v else 0.0 for x, v in zip(xs, vs)]
    return out


def test_group_advantages_leave_invalid_rewards_out_of_the_group_statistics():
    nan = float("nan")
    # the example of the reliability issue: three identical valid completions in group 0 must get 0
    r = torch.tensor([1.0, 1.0, nan, 1.0, 0.0, 1.0, 0.0, 1.0])
    valid = torch.isfinite(r)
    adv = group_advantages(r, 4, valid=valid)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[4:].tolist() == pytest.approx(ref_group_advantages(r.tolist(), valid.tolist(), 4, "group")[4:], abs=1e-6)
    # random rewards and masks, a group with one valid entry and one with none, against the loop
    torch.manual_seed(0)
    G = 5
    r = torch.randn(6 * G, dtype=torch.float64)
    valid = torch.rand(6 * G) > 0.3
    valid[:G] = torch.tensor([False, True, False, False, False])
    valid[G:2 * G] = False
    r[~valid] = torch.where(torch.rand(int((~valid).sum())) > 0.5, nan, 1e6).to(r.dtype)  # garbage where invalid
    for scale in ("group", "batch", "none"):
        out = group_advantages(r, G, scale=scale, valid=valid)
        assert torch.isfinite(out).all()
        assert out.tolist() == pytest.approx(ref_group_advantages(r.tolist(), valid.tolist(), G, scale), abs=1e-9)
    # all valid: the same as no mask at all
    full = torch.randn(3 * G)
    assert torch.equal(group_advantages(full, G, valid=torch.ones(3 * G, dtype=torch.bool)), group_advantages(full, G))
    mean, std, count = group_stats(r, G, valid)
    assert count.tolist() == [float(valid[g * G:(g + 1) * G].sum()) for g in range(6)]
    assert std[:2].tolist() == [0.0, 0.0] and mean[1].item() == 0.0


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="flat"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(8), 4, scale="bogus")
