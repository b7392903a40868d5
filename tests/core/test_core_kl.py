import math

import pytest
import torch

from rlhf.core import (
    AdaptiveKLController,
    FixedKLController,
    ProportionalKLController,
    kl_controller,
    kl_estimate,
)

torch.set_num_threads(1)


def test_closed_forms_and_k3_nonnegative():
    torch.manual_seed(0)
    logp, ref = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    d = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), d)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(-d) + d - 1)
    assert torch.all(kl_estimate(logp, ref, "k3") >= 0)
    # clamped: a huge log-ratio stays finite
    big = kl_estimate(torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0]), "k3")
    assert torch.all(torch.isfinite(big))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_k1_k3_unbiased_for_categorical_kl():
    torch.manual_seed(1)
    logp_all = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)
    logq_all = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)
    p = logp_all.exp()
    exact = (p * (logp_all - logq_all)).sum().item()
    for kind in ("k1", "k3"):
        # exact expectation under p, then a Monte-Carlo average of samples from p
        expectation = (p * kl_estimate(logp_all, logq_all, kind)).sum().item()
        assert expectation == pytest.approx(exact, rel=1e-10)
        x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(2))
        mc = kl_estimate(logp_all[x], logq_all[x], kind).mean().item()
        assert mc == pytest.approx(exact, abs=0.02)


def test_adaptive_controller_rule():
    c = AdaptiveKLController(1.0, target=0.01)
    assert c.update(0.001) == 0.5  # < target / 1.5
    assert c.update(0.02) == 1.0  # > target * 1.5
    assert c.update(torch.tensor(0.01)) == 1.0  # within the band
    assert c.update(0.0067) == 1.0 and c.update(0.0149) == 1.0
    c2 = AdaptiveKLController(7.0, 3.0)
    c2.load_state_dict(c.state_dict())
    assert (c2.beta, c2.target) == (1.0, 0.01)


def test_proportional_controller_rule():
    c = ProportionalKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error clipped at +0.2
    b = c.beta
    assert c.update(6.6, n_steps=100) == pytest.approx(b * (1 + 0.1 * 100 / 10_000))
    b = c.beta
    assert c.update(0.0, n_steps=100) == pytest.approx(b * (1 - 0.2 * 100 / 10_000))  # clipped at -0.2
    c2 = ProportionalKLController(1.0, 1.0, 1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()


def test_fixed_controller_and_factory():
    c = FixedKLController(0.05)
    assert c.update(100.0) == 0.05
    assert isinstance(kl_controller("fixed", 0.1), FixedKLController)
    assert isinstance(kl_controller("adaptive", 0.1, target=0.01), AdaptiveKLController)
    assert isinstance(kl_controller("proportional", 0.1, target=6, horizon=1e4), ProportionalKLController)
    with pytest.raises(ValueError):
        kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError):
        kl_controller("pid", 0.1, target=1)
    assert math.isclose(c.state_dict()["beta"], 0.05)


def test_truncated_importance_weights_match_a_python_loop():
    from rlhf.core import truncated_importance_weights

    torch.manual_seed(0)
    logp, sampler_logp = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    cap = 1.5
    token = truncated_importance_weights(logp, sampler_logp, mask, cap, "token")
    sequence = truncated_importance_weights(logp, sampler_logp, mask, cap, "sequence")
    for b in range(3):
        log_ratio_sum = 0.0
        for t in range(5):
            if mask[b, t]:
                log_ratio_sum += float(logp[b, t] - sampler_logp[b, t])
        for t in range(5):
            want_token = min(math.exp(float(logp[b, t] - sampler_logp[b, t])), cap) if mask[b, t] else 0.0
            want_seq = min(math.exp(log_ratio_sum), cap) if mask[b, t] else 0.0
            assert abs(float(token[b, t]) - want_token) < 1e-6
            assert abs(float(sequence[b, t]) - want_seq) < 1e-6
    # both sides of the cap occur, and equal log-probs give weight 1
    assert (token[mask.bool()] == cap).any() and (token[mask.bool()] < cap).any()
    assert torch.equal(truncated_importance_weights(logp, logp, mask), mask.float())
    # a huge log-ratio is capped, not inf
    assert float(truncated_importance_weights(torch.zeros(1, 1), torch.full((1, 1), -1e4), torch.ones(1, 1))) == 2.0
