"""Networks for `classic`: MLP and Nature-CNN torsos, and Q-networks (plain or dueling).

Nature CNN: Mnih et al. 2015, "Human-level control through deep RL", Methods (three conv
layers 32x8x8/4, 64x4x4/2, 64x3x3/1, then 512 units). Dueling heads: Wang et al. 2016; the
aggregation of the two streams is `rlhf.core.dueling_q`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rlhf.core import dueling_q


def layer_init(layer: nn.Module, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights with `gain`, constant bias (Andrychowicz et al. 2021, "What Matters in On-Policy RL", C.3)."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int | None = None, activation=nn.ReLU,
        out_gain: float | None = None) -> nn.Sequential:
    """Linear layers with `activation` between them; no activation after the last one if `out_dim` is set.

    With `out_gain`, every layer gets `layer_init`: gain sqrt(2) in the hidden layers, `out_gain` for the
    output (the actor-critic's init); without, torch's default init (the Q-networks').
    """
    def linear(n_in: int, n_out: int, gain: float) -> nn.Linear:
        layer = nn.Linear(n_in, n_out)
        return layer if out_gain is None else layer_init(layer, gain)

    layers: list[nn.Module] = []
    for h in hidden_sizes:
        layers += [linear(in_dim, h, math.sqrt(2)), activation()]
        in_dim = h
    if out_dim is not None:
        layers.append(linear(in_dim, out_dim, out_gain))
    return nn.Sequential(*layers)


def numpy_mlp(layers: Sequence[nn.Module]) -> Callable[[np.ndarray], np.ndarray]:
    """The forward pass of Linear / ReLU / Tanh `layers` as a numpy function, for acting (CPU, float32).

    Acting runs one tiny batch per env step, where torch's per-op dispatch and nn.Module call overhead
    (~5-10 us per layer) cost far more than the arithmetic; the numpy version of a 64-64 MLP is ~6x
    faster. It reads numpy *views* of the parameters (shared memory), so in-place updates (optimiser
    steps, `load_state_dict`, the target net's `lerp_`) are seen without copying; rebuild it if the
    parameters are replaced (e.g. moved to another device).
    """
    ops: list = []
    for m in layers:
        if isinstance(m, nn.Linear):
            ops.append((m.weight.detach().numpy().T, m.bias.detach().numpy()))  # views, not copies
        elif isinstance(m, (nn.ReLU, nn.Tanh)):
            ops.append(np.tanh if isinstance(m, nn.Tanh) else _relu)
        else:
            raise TypeError(f"numpy_mlp: unsupported layer {type(m).__name__}")

    def forward(x: np.ndarray) -> np.ndarray:
        for op in ops:
            x = op(x) if callable(op) else x @ op[0] + op[1]
        return x

    return forward


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


# `clip_grad_norm` and `adam_step` call the kernels of torch's own `clip_grad_norm_(foreach=True)` and
# `Adam(fused=True).step()` directly. Those kernels are private: where this torch lacks one (fused Adam runs
# on CPU since torch 2.4), both take the public call instead, with the same result (tested).
PRIVATE_KERNELS = torch.__version__ >= (2, 4) and all(
    hasattr(torch, name) for name in ("_foreach_norm", "_foreach_mul_", "_foreach_add_", "_fused_adam_"))
FUSED_ADAM = True  # one fused kernel per Adam step instead of a loop over parameters: ~1.5x faster updates on CPU


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)` for parameters on one device.

    The same kernels and math (total 2-norm; grads scaled by min(1, max_norm / (norm + 1e-6))), so
    the same bits (tested), without torch's per-call grouping of the tensors by device and dtype:
    that Python costs about as much as the kernels themselves, on every gradient step.
    """
    if not PRIVATE_KERNELS:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def adam_step(optimizer: torch.optim.Adam) -> None:
    """`optimizer.step()` of a fused `torch.optim.Adam`: the same kernel on the same state, so the same bits
    (tested), without `Optimizer.step`'s per-call Python (hooks, profiler scope, grouping the tensors by device
    and dtype), which for the small networks here costs more than the kernel itself. Anything else (the first
    step, which creates the state; several groups; amsgrad, maximize, decoupled weight decay, a tensor lr,
    mixed devices or dtypes; a torch without the kernel) goes through `optimizer.step()`.
    """
    group = optimizer.param_groups[0]
    params = [p for p in group["params"] if p.grad is not None]
    states = [optimizer.state.get(p) for p in params]
    if (not PRIVATE_KERNELS or len(optimizer.param_groups) != 1 or not group.get("fused") or group["amsgrad"]
            or group["maximize"] or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor)
            or not all(states) or len({(p.device, p.dtype) for p in params}) != 1):
        optimizer.step()
        return
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                       beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                       eps=group["eps"], maximize=False)


class NatureCNN(nn.Module):
    """Conv torso of the Nature DQN on uint8 frames (B, C, 84, 84) -> features (B, out_dim).

    `out_dim=None` stops after the convolutions (B, 3136), for heads with their own hidden layer.
    """

    def __init__(self, in_channels: int = 4, out_dim: int | None = 512):
        super().__init__()
        layers = [
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        ]
        if out_dim is not None:
            layers += [nn.Linear(64 * 7 * 7, out_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim or 64 * 7 * 7

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames.float() / 255.0)  # scale here so the replay keeps uint8


class QNetwork(nn.Module):
    """Q(s, .) for discrete actions: a torso (MLP on vectors, Nature CNN on frames) and a head.

    `dueling="none"`: one linear head. `"mean"` / `"max"`: a value stream V(s) and an advantage
    stream A(s, .) (each with its own hidden layer, as in Wang et al. 2016) combined by
    `dueling_q`. Observations: float vectors (B, D), or uint8 frame stacks (B, C, 84, 84).
    """

    def __init__(self, obs_shape: Sequence[int], n_actions: int, hidden_sizes: Sequence[int] = (120, 84),
                 dueling: str = "none"):
        super().__init__()
        self.dueling = dueling
        if len(obs_shape) == 3:  # dueling streams get their own 512-unit layer, as in the paper
            self.torso = NatureCNN(obs_shape[0], out_dim=512 if dueling == "none" else None)
            feat, head_hidden = self.torso.out_dim, [512]
        else:
            body = list(hidden_sizes[:-1]) if dueling != "none" else list(hidden_sizes)
            self.torso = mlp(int(obs_shape[0]), body)
            feat = body[-1] if body else int(obs_shape[0])
            head_hidden = list(hidden_sizes[-1:]) if dueling != "none" else []
        if dueling == "none":
            self.head = nn.Linear(feat, n_actions)
        else:
            self.value = mlp(feat, head_hidden, 1)
            self.advantage = mlp(feat, head_hidden, n_actions)

    def numpy_forward(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """`forward` in numpy for acting (`numpy_mlp`); None where it does not apply (CNN, dueling)."""
        if self.dueling != "none" or isinstance(self.torso, NatureCNN):
            return None
        return numpy_mlp([*self.torso, self.head])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.torso(obs)  # (B, F)
        if self.dueling == "none":
            return self.head(x)  # (B, A)
        return dueling_q(self.value(x), self.advantage(x), mode=self.dueling)  # (B, A)
