"""Trust-region tools for TRPO: flat parameter vectors, Fisher-vector products, conjugate
gradient, the step size that meets the KL constraint, a backtracking line search, and the dual
update of the KL multiplier of the penalised form.

References:
- Schulman et al. 2015, "Trust Region Policy Optimization", sec. 6 and appendix C
  (natural-gradient direction by conjugate gradient on Fisher-vector products, step size
  sqrt(2 delta / s^T F s), backtracking line search on the surrogate and the KL constraint).
- Nocedal & Wright, "Numerical Optimization", Alg. 5.2 (conjugate gradient).
- Pearlmutter 1994 (Hessian-vector products by double backpropagation).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _param_list(model_or_params) -> list[torch.Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return list(model_or_params)


def flat_grad(
    y: torch.Tensor,
    params: Iterable[torch.Tensor],
    retain_graph: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """Gradient of the scalar ``y`` w.r.t. ``params``, flattened and concatenated (0 for unused).

    Shapes: y scalar; params list of tensors with P entries in all; returns (P,).
    """
    params = _param_list(params)
    grads = torch.autograd.grad(y, params, retain_graph=retain_graph, create_graph=create_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def flat_params(model_or_params) -> torch.Tensor:
    """Copy of the parameters as one flat vector (detached).

    Shapes: returns (P,).
    """
    return torch.cat([p.detach().reshape(-1) for p in _param_list(model_or_params)]).clone()


@torch.no_grad()
def set_flat_params(model_or_params, flat: torch.Tensor) -> None:
    """Write a flat vector back into the parameters, in place (inverse of :func:`flat_params`).

    Shapes: flat (P,).
    """
    offset = 0
    for p in _param_list(model_or_params):
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters have {offset}")


def fisher_vector_product(
    kl: torch.Tensor | Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    v: torch.Tensor,
    damping: float = 0.0,
) -> torch.Tensor:
    """(H + damping I) v with H the Hessian of the mean KL w.r.t. params, by double backprop.

    At theta = theta_old the Hessian of mean KL(pi_old || pi_theta) (pi_old detached) is the
    Fisher information matrix (TRPO, Schulman et al. 2015, appendix C.1; Pearlmutter 1994).
    ``kl`` is either a callable returning the scalar mean KL (recomputed at each call), or a
    scalar tensor whose graph is kept so it can be reused across conjugate-gradient iterations.
    TRPO implementations commonly use damping = 0.1.

    Shapes: kl scalar; v (P,); returns (P,).
    """
    params = _param_list(params)
    kl_value = kl() if callable(kl) else kl
    g = flat_grad(kl_value, params, retain_graph=True, create_graph=True)  # (P,)
    hv = flat_grad((g * v.detach()).sum(), params, retain_graph=not callable(kl))  # (P,)
    return hv + damping * v


def conjugate_gradient(
    Avp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Solve A x = b for symmetric positive-definite A given only x -> A x (Nocedal & Wright Alg. 5.2).

    TRPO (Schulman et al. 2015, appendix C) uses it with A the Fisher matrix and b the policy
    gradient. Stops after ``iters`` products or when the squared residual is below ``residual_tol``.

    Shapes: b (P,); Avp maps (P,) -> (P,); returns x (P,).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = r @ r
    for _ in range(iters):
        if rdotr.item() < residual_tol:
            break
        Ap = Avp(p)
        alpha = rdotr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        new_rdotr = r @ r
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x


def trpo_step_size(step_dir: torch.Tensor, fvp_step_dir: torch.Tensor, max_kl: float) -> torch.Tensor:
    """Scale beta = sqrt(2 max_kl / (s^T F s)) so the quadratic KL model of beta s equals max_kl.

    TRPO, Schulman et al. 2015, appendix C: 0.5 (beta s)^T F (beta s) = delta.

    Shapes: step_dir s (P,), fvp_step_dir F s (P,); returns a scalar.
    """
    shs = (step_dir * fvp_step_dir).sum()
    return torch.sqrt(2 * max_kl / shs.clamp_min(torch.finfo(shs.dtype).tiny))


def kl_dual_update(beta: float, kl: float, max_kl: float, lr: float) -> float:
    """Dual (projected gradient) ascent on the multiplier beta of the KL constraint: max(0, beta + lr (KL - max_kl)).

    The Lagrangian relaxation of TRPO's constraint (Schulman et al. 2015, sec. 4, the penalised form):
    L(theta, beta) = surrogate - beta (KL - max_kl) is maximised in theta and minimised in beta >= 0, by
    a gradient step of size lr against dL/dbeta = -(KL - max_kl), projected onto beta >= 0.

    Shapes: all scalars (python floats); returns the new beta.
    """
    return max(0.0, beta + lr * (kl - max_kl))


@torch.no_grad()
def backtracking_line_search(
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
    fullstep: torch.Tensor,
    max_kl: float | None = None,
    max_backtracks: int = 10,
    backtrack_coef: float = 0.8,
    expected_improve: float | None = None,
    accept_ratio: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """Shrink ``fullstep`` geometrically until it improves the surrogate within the KL limit.

    Tries step = coef^k * fullstep for k = 0..max_backtracks-1 and accepts the first whose
    ``evaluate(step) -> (improvement, kl)`` has improvement > 0 (surrogate gain over the old
    parameters, larger is better), kl <= max_kl (unless max_kl is None), and, when
    ``expected_improve`` (g^T fullstep, the linear model's gain) is given, improvement >=
    accept_ratio * coef^k * expected_improve (TRPO, Schulman et al. 2015, appendix C).
    ``evaluate`` typically sets theta_old + step, computes surrogate and KL, and may leave the
    parameters modified: the caller then sets theta_old + returned step (zero if none accepted).

    Shapes: fullstep (P,); returns (step (P,), info dict with python scalars:
    accepted, step_frac, backtracks, improvement, kl).
    """
    for k in range(max_backtracks):
        frac = backtrack_coef**k
        step = frac * fullstep
        improvement, kl = evaluate(step)
        improvement, kl = float(improvement), float(kl)
        ok = improvement > 0 and (max_kl is None or kl <= max_kl)
        if ok and expected_improve is not None:
            ok = improvement >= accept_ratio * frac * float(expected_improve)
        if ok:
            return step, {"accepted": True, "step_frac": frac, "backtracks": k, "improvement": improvement, "kl": kl}
    return torch.zeros_like(fullstep), {
        "accepted": False,
        "step_frac": 0.0,
        "backtracks": max_backtracks,
        "improvement": 0.0,
        "kl": 0.0,
    }
