"""classic.nets: the numpy acting path, and the gradient clipping and Adam helpers (with and without torch's private
kernels), agree with torch."""

import numpy as np
import pytest
import torch

from classic import nets
from classic.nets import QNetwork, adam_step, clip_grad_norm, numpy_mlp


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and a norm under the bound (scale 1)
def test_clip_grad_norm_equals_torch(max_norm):
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(32, 4)
    for net in nets:
        (net(x) ** 2).sum().backward()
    ours = clip_grad_norm(list(nets[0].parameters()), max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm, foreach=True)
    assert torch.equal(ours, theirs)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_equals_torch_fused_adam_bit_for_bit(weight_decay):
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.Adam(net.parameters(), lr=3e-3, eps=1e-5, weight_decay=weight_decay, fused=True)
            for net in nets]
    for step in range(5):  # the first step creates the state (torch's own path), the rest take the short one
        x = torch.randn(32, 4)
        for net in nets:
            net.zero_grad(set_to_none=True)
            (net(x) ** 2).sum().backward()
        if step == 3:  # lr changed between steps (annealing) is read each step
            for opt in opts:
                opt.param_groups[0]["lr"] = 1e-3
        adam_step(opts[0])
        opts[1].step()
        if step == 0:  # from now on the short path must be taken, not torch's
            opts[0].step = lambda *a, **k: pytest.fail("adam_step went through optimizer.step()")
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(p, q)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(opts[0].state[p]["exp_avg_sq"], opts[1].state[q]["exp_avg_sq"])
        assert torch.equal(opts[0].state[p]["step"], opts[1].state[q]["step"])


def test_without_torchs_private_kernels_the_public_calls_give_the_same_parameters(monkeypatch):
    """The fallback where torch lacks `_fused_adam_` / `_foreach_norm` (PRIVATE_KERNELS false) trains the same bits."""
    torch.manual_seed(0)
    twins = [torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)) for _ in range(2)]
    twins[1].load_state_dict(twins[0].state_dict())
    opts = [torch.optim.Adam(net.parameters(), lr=3e-3, eps=1e-5, fused=True) for net in twins]
    for step in range(6):
        x = torch.randn(32, 4)
        for private, net, opt in zip((True, False), twins, opts):
            monkeypatch.setattr(nets, "PRIVATE_KERNELS", private)
            net.zero_grad(set_to_none=True)
            (net(x) ** 2).sum().backward()
            norm = clip_grad_norm(list(net.parameters()), 0.5)  # clips: the gradients' norm is well above 0.5
            adam_step(opt)
        assert norm > 0.5
        for p, q in zip(*(net.parameters() for net in twins)):
            assert torch.equal(p, q)


def test_adam_step_falls_back_to_torch_for_an_unfused_optimizer():
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)  # not fused: torch's path, still a correct step
    before = net.weight.detach().clone()
    net(torch.ones(1, 4)).sum().backward()
    adam_step(opt)
    assert not torch.equal(before, net.weight) and int(opt.state[net.weight]["step"]) == 1


def test_numpy_forward_matches_torch_and_sees_in_place_updates():
    torch.manual_seed(0)
    q = QNetwork((4,), 3, [64, 64])
    forward = q.numpy_forward()
    obs = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    np.testing.assert_allclose(forward(obs), q(torch.from_numpy(obs)).detach().numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # an optimiser step / load_state_dict / target lerp_ all write in place
        for p in q.parameters():
            p.mul_(1.5)
    np.testing.assert_allclose(forward(obs), q(torch.from_numpy(obs)).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert QNetwork((4,), 3, [64, 64], dueling="mean").numpy_forward() is None
    assert QNetwork((4, 84, 84), 3).numpy_forward() is None
    with pytest.raises(TypeError, match="unsupported layer"):
        numpy_mlp([torch.nn.Linear(4, 4), torch.nn.Dropout()])
