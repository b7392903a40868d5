"""float32 linear layers on CPU through oneDNN instead of MKL.

torch's float32 matmul on CPU is MKL's sgemm, and MKL runs its AVX2 code on AMD CPUs. On a Zen 5 core,
whose AVX-512 units are a full 512 bits wide, that is half of what oneDNN's AVX-512 kernels (also in every
torch build) reach: (480, 64) x (64, 256), the built-in model's MLP on a batch of 32 DPO pairs, takes 154 us
in MKL and 76 us in oneDNN (about 100 vs 200 GFLOP/s, one thread), the backward's products 163 / 189 us vs
83 / 132 us; the values agree to float32 rounding. A oneDNN call costs 10-20 us more, though, and its first
call at a new shape about 1 ms (it builds the kernel): (96, 64) x (64, 64) takes 12 us in MKL and 23 in oneDNN.

`OneDNNLinear` is nn.Linear whose float32 CPU forward and backward run oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`, the kernel inductor uses for CPU linears) from MIN_MACS multiply-adds
per product up; elsewhere (smaller products, other devices and dtypes, autocast, torch.compile) it is nn.Linear.
`use_onednn_linear` switches a model's nn.Linear layers to it on AMD CPUs with full-width AVX-512 units (Zen 5,
CPU family 26, and later); the parameters, and so the checkpoint, are unchanged. Zen 4 (family 25) runs AVX-512 on
256-bit halves, and there MKL's AVX2 code is as fast or faster: (480, 64) x (64, 256) forward 184 us in MKL, 200
in oneDNN, its weight gradient 236 vs 354 us, and a DPO step of the built-in model as fast with MKL's
(`scripts/bench_dpo.py --analysis`). On Intel's CPUs MKL runs its own AVX-512 code and stays torch's choice: on
an Intel Xeon with AMX (family 6, model 167) (480, 64) x (64, 256) takes 206 us in MKL and 192 in oneDNN,
(480, 256) x (256, 64) 162 vs 190, and a DPO step is faster with MKL's (policy forward + backward 26.0 vs 26.9 ms,
reference forward 9.0 vs 11.7; the same `--analysis`).
"""

from __future__ import annotations

import re

import torch
from torch import nn


# rows x in x out: below about this, MKL is as fast or faster (measured at widths 64 and 256)
MIN_MACS = 1 << 21


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in oneDNN: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ W
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
        grad_w = onednn_linear(grad_2d.t(), x_2d.t()) if ctx.needs_input_grad[1] else None  # grad.T @ x
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear whose float32 forward and backward on CPU run in oneDNN (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or x.dim() < 2 or x.numel() == 0 or x.numel() * self.out_features < MIN_MACS
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)


def onednn_available() -> bool:
    """Whether this torch runs AVX-512 code on this CPU and has oneDNN's linear kernel."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def full_width_avx512_amd(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text describes an AMD CPU of family 26 (Zen 5) or later."""
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.MULTILINE)
    return "AuthenticAMD" in cpuinfo and family is not None and int(family.group(1)) >= 26


def onednn_pays() -> bool:
    """Whether oneDNN's float32 linear beats MKL's here (see the module's docstring)."""
    if not onednn_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return full_width_avx512_amd(f.read(4096))
    except OSError:
        return False


def use_onednn_linear(model: nn.Module) -> nn.Module:
    """Switch the model's nn.Linear layers (LoRA's included: call it after adding adapters) to `OneDNNLinear`
    where that pays (`onednn_pays`); the parameters, and so the checkpoint, are untouched."""
    if onednn_pays():
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
    return model
