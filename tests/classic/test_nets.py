"""classic.nets: the numpy acting path and the gradient clipping helper agree with torch."""

import numpy as np
import pytest
import torch

from classic.nets import QNetwork, clip_grad_norm, numpy_mlp


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
