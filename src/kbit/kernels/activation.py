"""SwiGLU, ``silu(gate) · up``, with a fused backward: one autograd op, a PyTorch reference and a Triton kernel.

    a = silu(g) = g · σ(g),  out = a · up
    d_up = dout · a,   d_g = (dout · up) · σ(g) · (1 + g · (1 - σ(g)))

Only gate and up are saved (as a plain ``act(gate) * up`` saves them too); silu is recomputed in the backward,
so the activation a is never stored. Rounding follows the unfused PyTorch ops in low precision (a rounded to
the input dtype before the product; dout · up rounded before the silu derivative), so in bf16 the fused op
gives the same values as transformers' MLP, not merely close ones.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .norm import _acc


def swiglu_forward_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for 2-D inputs of one dtype: the PyTorch reference."""
    a = torch.nn.functional.silu(_acc(gate)).to(gate.dtype)
    return (_acc(a) * _acc(up)).to(gate.dtype)


def swiglu_backward_ref(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up) for 2-D inputs: the PyTorch reference of the backward."""
    g = _acc(gate)
    sig = torch.sigmoid(g)
    a = (g * sig).to(gate.dtype).to(g.dtype)
    d_up = _acc(dout) * a
    da = (_acc(dout) * _acc(up)).to(gate.dtype).to(g.dtype)
    d_gate = da * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def _impl(x: torch.Tensor):
    if use_triton(x):
        from .triton import swiglu

        return swiglu.swiglu_forward, swiglu.swiglu_backward
    return swiglu_forward_ref, swiglu_backward_ref


def _rows(t: torch.Tensor) -> torch.Tensor:
    # [..., I] -> [rows, I] without a copy where the strides allow it (Phi3's chunk of gate_up is such a view).
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """out = silu(gate) · up, recomputing silu in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        fwd, bwd = _impl(gate)
        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.bwd = bwd
        return fwd(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        d_gate, d_up = ctx.bwd(_rows(dout), g2, u2)
        return d_gate.view(dout.shape), d_up.view(dout.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with a fused backward; Triton on CUDA, PyTorch elsewhere."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    return SwiGLUFunction.apply(gate, up)
