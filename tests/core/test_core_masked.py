import threading

import pytest
import torch

from rlhf.core import aggregate_loss, explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

torch.set_num_threads(1)

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_masked_reductions_match_selection():
    sel = X[M.bool()]
    assert masked_sum(X, M).item() == pytest.approx(sel.sum().item())
    assert masked_mean(X, M).item() == pytest.approx(sel.mean().item())
    assert torch.allclose(masked_mean(X, M, dim=1), torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert masked_var(X, M).item() == pytest.approx(sel.var().item())
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(sel.var(unbiased=False).item())
    # empty mask gives 0, not NaN
    assert masked_mean(X, torch.zeros_like(M)).item() == 0.0
    assert masked_mean(X, None).item() == pytest.approx(X.mean().item())


def test_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64) * 3 + 2
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    w = masked_whiten(x, m)
    sel = w[m.bool()]
    assert abs(sel.mean().item()) < 1e-9
    assert sel.var().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w[~m.bool()] == 0)
    w2 = masked_whiten(x, m, shift_mean=False)
    assert w2[m.bool()].mean().item() == pytest.approx(x[m.bool()].mean().item(), rel=1e-9)


def naive_whiten(x, m, shift_mean=True, eps=1e-8):
    """A Python loop over the masked entries: mean, unbiased variance, then (x - mean) / sqrt(var + eps)."""
    vals = [float(v) for v, keep in zip(x.flatten(), m.flatten()) if keep]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    out = [((float(v) - mean) / (var + eps) ** 0.5 + (0 if shift_mean else mean)) * float(keep)
           for v, keep in zip(x.flatten(), m.flatten())]
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def on_shards(fn, shards):
    """Run fn(*shard, all_reduce) on every shard at once (a thread each), all_reduce summing over the shards,
    as `rlhf.distributed.reduce_sum` does over processes."""
    barrier, slots, results = threading.Barrier(len(shards)), [None] * len(shards), [None] * len(shards)

    def run(i):
        def all_reduce(t):
            slots[i] = t
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read the slots before they are reused
            return total
        results[i] = fn(*shards[i], all_reduce)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_across_shards_matches_the_whole_batch(shift_mean):
    """With all_reduce the statistics are those of all shards: 2 shards of B whiten as 1 batch of 2B."""
    torch.manual_seed(1)
    x = torch.randn(6, 5) * 2 + 0.5  # float32, as in training
    m = (torch.rand(6, 5) > 0.3).long()
    whole = masked_whiten(x, m, shift_mean=shift_mean)
    assert torch.allclose(whole.double(), naive_whiten(x, m, shift_mean), atol=1e-5)
    # the identity reduction is one shard: the same bits as no reduction
    assert torch.equal(masked_whiten(x, m, shift_mean=shift_mean, all_reduce=lambda t: t), whole)
    shards = [(x[:2], m[:2]), (x[2:], m[2:])]
    parts = on_shards(lambda xs, ms, reduce: masked_whiten(xs, ms, shift_mean=shift_mean, all_reduce=reduce), shards)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_explained_variance():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(r, r).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(r, 2.5), r).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(r, torch.ones(4)).item() == 0.0


def test_aggregate_modes_hand_numbers():
    assert aggregate_loss(X, M, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(X, M, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(X, M, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate_loss(X, M, "seq-mean-token-sum-norm", max_len=8).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    # 1-D per-sample losses without mask: every mode is the plain mean
    v = torch.tensor([1.0, 2.0, 6.0])
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert aggregate_loss(v, None, mode).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        aggregate_loss(X, M, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_global_normaliser_shards_sum_to_full_batch(mode):
    torch.manual_seed(1)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    w = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    full = aggregate_loss(w**2, mask, mode)
    (g_full,) = torch.autograd.grad(full, w)
    n_tok, n_seq = mask.sum(), B
    shards = [slice(0, 2), slice(2, 6)]  # unequal shards: a plain mean of means would be wrong
    total = sum(aggregate_loss(w[s] ** 2, mask[s], mode, num_tokens=n_tok, num_seqs=n_seq, max_len=T) for s in shards)
    (g_shards,) = torch.autograd.grad(total, w)
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(g_full, g_shards)
