"""Pieces shared by the quantized linear layers: the frozen-weight matmul and dtype-safe conversion.

``DequantLinear`` keeps only a *dequantizer* for backward (a ``functools.partial`` over the packed weight
and its statistics), never a dequantized copy: activation memory stays that of a plain linear, and the
weight is rebuilt when the input gradient needs it. A fused dequant-matmul kernel can later replace the
body without changing the contract.

``apply_keeping_dtype`` is what the layers' ``_apply`` uses so that ``.to(device)`` moves packed weights
and statistics while dtype conversions (``.half()``, ``.to(torch.float32)``, ``.type(...)``) leave their
bytes alone: a packed weight stored as bfloat16 is not a bfloat16 number, and converting it would
corrupt it (bitsandbytes#1945).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

Dequantizer = Callable[..., torch.Tensor]  # called as dequant(out_dtype=dtype) -> weight [out, in]


class DequantLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W = dequant(x.dtype)`` frozen: gradients for ``x`` and ``b`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, dequant: Dequantizer) -> torch.Tensor:
        ctx.dequant = dequant  # holds the packed weight and its statistics, not a dequantized copy
        ctx.has_bias = bias is not None
        return F.linear(x, dequant(out_dtype=x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.dequant(out_dtype=grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def dequant_linear(
    x: torch.Tensor, dequant: Dequantizer, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """Frozen quantized linear computed in ``compute_dtype``, returned in ``x.dtype``."""
    xc = x.to(compute_dtype)
    bc = None if bias is None else bias.to(compute_dtype)  # differentiable; the stored bias is not rewritten
    return DequantLinear.apply(xc, bc, dequant).to(x.dtype)


def apply_keeping_dtype(
    fn: Callable[[torch.Tensor], torch.Tensor], frozen: Iterable[torch.Tensor | None]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``Module._apply`` function so the ``frozen`` tensors may change device but never dtype."""
    frozen_ids = {id(t) for t in frozen if t is not None}

    def guarded(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in frozen_ids:
            return fn(t)
        # What fn does to an empty tensor of the same kind tells a device move from a cast, cheaply.
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        if probe.dtype == t.dtype:
            return fn(t)  # a device move, pin_memory, to_empty, share_memory...: let it through unchanged
        return t.to(probe.device)  # a dtype conversion: move the bytes only, keep their dtype

    return guarded


def linear_bias(in_features: int, out_features: int, device: torch.device) -> torch.nn.Parameter:
    """A bias initialised as ``nn.Linear`` does (uniform within 1/sqrt(in_features)); left empty on ``meta``."""
    bias = torch.nn.Parameter(torch.empty(out_features, device=device))
    if device.type != "meta":
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        torch.nn.init.uniform_(bias, -bound, bound)
    return bias
