"""Masked reductions and loss aggregation over padded (B, T) token batches.

A ``mask`` is 1 (or True) where a position counts and 0 on padding; it broadcasts
against ``x``. An empty mask gives 0 rather than NaN.

References:
- Token- vs sequence-level aggregation: verl ``core_algos.agg_loss``; OpenRLHF ``masked_mean``.
- "seq-mean-token-sum-norm": Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO),
  which divides each sequence's token sum by a constant instead of its own length.
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _mask_like(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x)
    # common case: skip two no-op dispatches (callers never write to it)
    if mask.dtype == x.dtype and mask.shape == x.shape:
        return mask
    return torch.broadcast_to(mask.to(x.dtype), x.shape)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # den == 0 only when num == 0 as well (nothing counted): return 0, not NaN.
    return num / den.clamp_min(torch.finfo(num.dtype).tiny)


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    Shapes: x (...), mask broadcastable to x; returns a scalar (dim=None) or x reduced over dim.
    """
    if mask is None:  # fast path: classic RL calls these with no mask on every minibatch
        return x.sum() if dim is None else x.sum(dim)
    m = _mask_like(x, mask)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (0 where nothing is set).

    Shapes: x (...), mask broadcastable to x; returns a scalar (dim=None) or x reduced over dim.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    m = _mask_like(x, mask)
    if dim is None:
        return _safe_div((x * m).sum(), m.sum())
    return _safe_div((x * m).sum(dim), m.sum(dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor | None, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``).

    Shapes: x (...), mask broadcastable to x; returns a scalar.
    """
    return _masked_moments(x, _mask_like(x, mask), unbiased)[1]


def _masked_moments(x: torch.Tensor, m: torch.Tensor, unbiased: bool, all_reduce=None):
    # (mean, variance, x - mean), shared by masked_var and masked_whiten so neither computes a moment twice.
    # Two passes (the variance around the mean, not E[x^2] - E[x]^2); `all_reduce` sums each over shards.
    total = (lambda t: t) if all_reduce is None else (lambda t: all_reduce(t).to(t.dtype))
    n = total(m.sum())
    mean = _safe_div(total((x * m).sum()), n)
    centered = x - mean
    var = _safe_div(total((centered**2 * m).sum()), n)
    if unbiased:
        var = var * _safe_div(n, (n - 1).clamp_min(1))
    return mean, var, centered


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce=None) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked positions.

    (x - mean) / sqrt(var + eps) with the unbiased variance, as the advantage whitening of PPO
    implementations for language models (Ziegler et al. 2019; TRL, OpenRLHF ``masked_whiten``).
    Statistics are taken over all masked entries of the batch; padding positions come back as 0.
    ``shift_mean=False`` keeps the original mean (as TRL does for per-token rewards in PPO).
    ``all_reduce``: a function summing a tensor over every shard of the batch (e.g. over processes:
    ``lambda t: rlhf.distributed.reduce_sum(accelerator, t)``); the statistics are then those of all
    shards' entries together, so W shards of B whiten as one batch of W x B. Without it (or with the
    identity) the result is the same, bit for bit, as for one shard.

    Shapes: x (B, T) or any shape, mask broadcastable to x; returns x.shape.
    """
    m = _mask_like(x, mask)
    mean, var, centered = _masked_moments(x, m, unbiased=True, all_reduce=all_reduce)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explained variance 1 - Var[R - V] / Var[R] of a value prediction (1 perfect, <= 0 useless).

    Logged as ``value/explained_var``; NaN-free: returns 0 when Var[R] is 0.
    Shapes: values, returns (...) same shape; mask broadcastable; returns a scalar.
    """
    var_r = masked_var(returns, mask)
    var_err = masked_var(returns - values, mask)
    return torch.where(var_r > 0, 1 - _safe_div(var_err, var_r), torch.zeros_like(var_r))


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    max_len: int | float | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    num_seqs: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar: token-level or sequence-level averaging.

    Modes (m = mask, L = per_token, sums over the valid tokens of a sequence):
    - ``"token-mean"``: sum_{b,t} m L / sum_{b,t} m. Every token weighs the same; long
      sequences count more (DAPO, Yu et al. 2025; PPO for classic RL where T=1).
    - ``"seq-mean-token-mean"``: mean_b [ sum_t m L / sum_t m ]. Every sequence weighs the same;
      the GRPO objective of Shao et al. 2024 (eq. 3) with its 1/|o_i| length normaliser.
    - ``"seq-mean-token-sum-norm"``: mean_b [ sum_t m L / max_len ], with a constant
      ``max_len`` (default ``mask.shape[-1]``): Dr. GRPO (Liu et al. 2025), which removes the
      length bias of 1/|o_i|.

    Global normalisers (distributed / gradient accumulation): by default the denominators are
    counted on this batch. Pass ``num_tokens`` (token-mean) or ``num_seqs`` (the two seq modes)
    = the count over *all* micro-batches and processes of one optimiser step; the result is then
    this shard's additive share, and summing it over shards gives the full-batch loss exactly
    (2 micro-batches of B == 1 batch of 2B). DDP averages gradients over its W processes, so a
    DDP caller multiplies the loss by W (or passes the global count divided by W).
    In ``seq-mean-token-mean`` the per-sequence token mean always uses the sequence's own
    length, which needs no global count. A sequence with no valid token contributes 0 but is
    still counted in the number of sequences.

    Shapes: per_token (B, T) (time is the last dim; any leading dims are sequences; a 1-D
    tensor is one sequence), mask broadcastable to per_token or None; returns a scalar.
    """
    m = _mask_like(per_token, mask)
    if mode == "token-mean":
        den = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype,
                                                                 device=per_token.device)
        return _safe_div((per_token * m).sum(), den)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, m, dim=-1)  # (B,)
    elif mode == "seq-mean-token-sum-norm":
        length = per_token.shape[-1] if max_len is None else max_len
        per_seq = (per_token * m).sum(-1) / length  # (B,)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
    n = per_seq.numel() if num_seqs is None else num_seqs
    return per_seq.sum() / n
