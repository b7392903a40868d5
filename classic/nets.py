"""Networks for `classic`: MLP and Nature-CNN torsos, and Q-networks (plain or dueling).

Nature CNN: Mnih et al. 2015, "Human-level control through deep RL", Methods (three conv
layers 32x8x8/4, 64x4x4/2, 64x3x3/1, then 512 units). Dueling heads: Wang et al. 2016; the
aggregation of the two streams is `rlhf.core.dueling_q`.

Mixed precision (`bf16`): the networks run their layers under `torch.autocast(..., torch.bfloat16)`
and hand back float32 outputs, so every caller (acting, targets, losses, GAE, evaluation) does its
math in float32 on float32 master weights; only the matmuls and convolutions run in bfloat16.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rlhf.core import dueling_q
from rlhf.runtime import arg


@dataclasses.dataclass
class PrecisionArgs:
    """Config fields of every `classic` command (a mixin next to `RunConfig`): arithmetic and memory format."""

    bf16: bool = arg(False, "Mixed precision: network forward passes (acting, targets, losses) under torch.autocast "
                            "in bfloat16 (CPUs with AVX512-BF16 or AMX, CUDA); weights, optimiser state, checkpoints "
                            "and the loss / return / advantage math stay float32.")
    channels_last: bool = arg(True, "CNNs (Atari): channels-last memory format for the conv weights and input frames "
                                    "(faster conv kernels on CPU, in fp32 and bf16 alike); MLPs ignore it.")


def precision(cfg: PrecisionArgs, cnn: bool) -> str:
    """What ran, for the startup line and summary.json: e.g. `bf16 autocast, channels_last` or `fp32`."""
    names = ["bf16 autocast" if cfg.bf16 else "fp32"] + (["channels_last"] if cnn and cfg.channels_last else [])
    return ", ".join(names)


def autocast(device_type: str, enabled: bool):
    """bfloat16 autocast on `device_type` if `enabled`, else a no-op context (no per-call cost)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def bf16_copy(net: nn.Module) -> nn.Module:
    """A bfloat16 copy of a `bf16` net, for forward passes without gradient (acting, targets).

    It computes what `net` computes under autocast (the same round-to-nearest casts of the same weights,
    so the same bits), but its weights are cast once, by `copy_weights` after `net` changed, instead
    of at every call: for a Nature CNN that cast costs about what a batch-1 forward pass does.
    """
    return copy.deepcopy(net).to(torch.bfloat16).requires_grad_(False)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy `src`'s parameters into `dst`'s (casting them to `dst`'s dtype)."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        d.copy_(s)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MB in the process instead of handing them back to the OS.

    By default a freed block of a few MB (a CNN's activations or gradients) goes back to the OS, and the next
    step's tensor of that size faults its pages in again and zeroes them: a Nature-CNN training step (batch 32,
    fp32, one thread) took 2.9k page faults and 5.6 ms of system time of its 20 ms. Fixed thresholds also stop
    glibc's dynamic ones. Larger blocks (a replay memory) are still mapped on their own. Not glibc: nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed (HEAP_MAX_SIZE / 2 on 64-bit)
    libc.mallopt(m_trim_threshold, 2**30)


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
        if self.net[0].weight.is_contiguous(memory_format=torch.channels_last):  # input follows the weights' format
            frames = frames.contiguous(memory_format=torch.channels_last)  # on uint8 (cheaper than in one .to())
        device = frames.device.type  # under autocast the first conv takes bf16 anyway: convert to it directly
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        return self.net(frames.to(dtype) / 255.0)  # scaled here so the replay keeps uint8 (0-255 are exact in bf16)


class QNetwork(nn.Module):
    """Q(s, .) for discrete actions: a torso (MLP on vectors, Nature CNN on frames) and a head.

    `dueling="none"`: one linear head. `"mean"` / `"max"`: a value stream V(s) and an advantage
    stream A(s, .) (each with its own hidden layer, as in Wang et al. 2016) combined by
    `dueling_q`. Observations: float vectors (B, D), or uint8 frame stacks (B, C, 84, 84).
    `bf16`: layers under bfloat16 autocast, Q-values returned in float32; `channels_last`: CNN
    weights (and so inputs) in channels-last memory format.
    """

    def __init__(self, obs_shape: Sequence[int], n_actions: int, hidden_sizes: Sequence[int] = (120, 84),
                 dueling: str = "none", bf16: bool = False, channels_last: bool = False):
        super().__init__()
        self.dueling, self.bf16 = dueling, bf16
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
        if channels_last and isinstance(self.torso, NatureCNN):
            self.to(memory_format=torch.channels_last)

    def numpy_forward(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """`forward` in float32 numpy (`numpy_mlp`); None where it does not apply (CNN, dueling)."""
        if self.dueling != "none" or isinstance(self.torso, NatureCNN):
            return None
        return numpy_mlp([*self.torso, self.head])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        with autocast(obs.device.type, self.bf16):
            x = self.torso(obs)  # (B, F)
            if self.dueling == "none":
                return self.head(x).float()  # (B, A)
            value, advantage = self.value(x), self.advantage(x)  # (B, 1), (B, A)
        return dueling_q(value.float(), advantage.float(), mode=self.dueling)  # (B, A)
