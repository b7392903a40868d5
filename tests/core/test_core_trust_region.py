import pytest
import torch

from rlhf.core import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    flat_params,
    kl_dual_update,
    set_flat_params,
    trpo_step_size,
)

torch.set_num_threads(1)


def test_flat_params_roundtrip_and_flat_grad():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    flat = flat_params(net)
    assert flat.shape == (8,)
    set_flat_params(net, flat * 2)
    assert torch.allclose(flat_params(net), flat * 2)
    with pytest.raises(ValueError):
        set_flat_params(net, torch.zeros(9))
    x = torch.randn(4, 3)
    y = net(x).pow(2).sum()
    g = flat_grad(y, net.parameters())
    y2 = net(x).pow(2).sum()
    y2.backward()
    assert torch.allclose(g, torch.cat([net.weight.grad.reshape(-1), net.bias.grad]))
    unused = torch.zeros(3, requires_grad=True)
    assert flat_grad(net(x).sum(), [net.bias, unused])[2:].abs().sum() == 0


def test_conjugate_gradient_vs_solve():
    g = torch.Generator().manual_seed(1)
    n = 8
    M = torch.randn(n, n, dtype=torch.float64, generator=g)
    A = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    x = conjugate_gradient(lambda v: A @ v, b, iters=30)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    assert torch.all(conjugate_gradient(lambda v: A @ v, torch.zeros(n, dtype=torch.float64)) == 0)


def test_fisher_vector_product_vs_explicit_hessian():
    torch.manual_seed(2)
    X = torch.randn(5, 3, dtype=torch.float64)
    W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    old_lp = torch.log_softmax(X @ W.detach().T + bias.detach(), -1)

    def kl_of(w, b):  # mean KL(old || new), categorical
        new_lp = torch.log_softmax(X @ w.T + b, -1)
        return (old_lp.exp() * (old_lp - new_lp)).sum(-1).mean()

    def kl_flat(theta):
        return kl_of(theta[:12].view(4, 3), theta[12:])

    theta = torch.cat([W.detach().reshape(-1), bias.detach()])
    H = torch.autograd.functional.hessian(kl_flat, theta)  # (16, 16) = Fisher at theta_old
    v = torch.randn(16, dtype=torch.float64)
    fvp_fn = fisher_vector_product(lambda: kl_of(W, bias), [W, bias], v)
    assert torch.allclose(fvp_fn, H @ v, atol=1e-10)
    kl_t = kl_of(W, bias)  # tensor form: reusable across calls
    for _ in range(2):
        assert torch.allclose(fisher_vector_product(kl_t, [W, bias], v, damping=0.1), H @ v + 0.1 * v, atol=1e-10)
    # natural gradient with CG on the damped Fisher == solve
    b = torch.randn(16, dtype=torch.float64)
    x = conjugate_gradient(lambda p: fisher_vector_product(kl_t, [W, bias], p, damping=0.1), b, iters=100,
                           residual_tol=1e-24)
    assert torch.allclose(x, torch.linalg.solve(H + 0.1 * torch.eye(16, dtype=torch.float64), b), atol=1e-6)


def test_trpo_step_size():
    s, Fs = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    beta = trpo_step_size(s, Fs, max_kl=0.01)
    assert beta.item() == pytest.approx(0.1)
    assert 0.5 * beta.item() ** 2 * (s @ Fs).item() == pytest.approx(0.01)


def _quadratic(step):  # improvement over x=0 of f(x) = -(x - 1)^2, kl = x^2
    x = step.item()
    return -((x - 1) ** 2) + 1.0, x**2


def test_backtracking_line_search():
    full = torch.tensor([3.0])
    step, info = backtracking_line_search(_quadratic, full)
    assert info["accepted"] and info["backtracks"] == 2  # 3 and 2.4 overshoot; 1.92 improves
    assert step.item() == pytest.approx(3 * 0.64)
    step, info = backtracking_line_search(_quadratic, full, max_kl=1.0)
    assert info["accepted"] and info["backtracks"] == 5 and info["kl"] <= 1.0
    assert step.item() == pytest.approx(3 * 0.8**5)
    assert info["step_frac"] == pytest.approx(0.8**5)
    # nothing improves: zero step
    step, info = backtracking_line_search(lambda s: (-1.0, 0.0), full)
    assert not info["accepted"] and step.item() == 0.0 and info["backtracks"] == 10
    # expected-improvement ratio test (TRPO appendix C): 1.92 improves by 0.1536 < 0.1 * 0.64 * 10
    _, info = backtracking_line_search(_quadratic, full, expected_improve=10.0)
    assert info["backtracks"] == 3  # 1.536 improves by 0.7128 >= 0.1 * 0.512 * 10
    calls = []
    backtracking_line_search(lambda s: calls.append(s.item()) or (1.0, 0.0), full)
    assert calls == [3.0]


def test_kl_dual_update_is_projected_gradient_descent_on_the_lagrangian():
    # reference: autograd on L(beta) = surrogate - beta (KL - max_kl), a step against dL/dbeta, clamped at 0
    beta, ref = 1.0, torch.tensor(1.0, dtype=torch.float64)
    for kl in [0.03, 0.02, 0.001, 0.0, 0.0, 0.5]:
        b = ref.clone().requires_grad_(True)
        lagrangian = 0.7 - b * (kl - 0.01)
        (grad,) = torch.autograd.grad(lagrangian, b)
        ref = (ref - 10.0 * grad).clamp_min(0.0)
        beta = kl_dual_update(beta, kl, max_kl=0.01, lr=10.0)
        assert beta == pytest.approx(ref.item(), abs=1e-12)
    assert kl_dual_update(0.05, 0.0, max_kl=0.01, lr=10.0) == 0.0  # under the bound long enough: no penalty, never < 0
