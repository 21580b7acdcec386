"""RMSNorm with a hand-written backward: one autograd op, a PyTorch reference and a Triton kernel behind it.

    n = x · rstd,  rstd = 1 / sqrt(mean(x²) + eps)   (float32)
    y = n · (w + offset)                             (offset 0: Llama, Mistral, Qwen, Phi3; 1: Gemma's (1 + w))

``round_normed`` rounds n to x's dtype before the weight multiply, which is Llama's order of operations
(``weight * hidden.to(input_dtype)``); Gemma multiplies in float32 and rounds once. Following the model's own
rounding keeps the fused path within an ulp of transformers' in bf16, not just within tolerance.

Backward, with w' = w + offset and g the incoming gradient (rows of length D):
    dx = rstd · (g·w' - n · mean(g·w'·n)),   dw = Σ_rows g · n
Only x and rstd ([rows] float32) are saved; n is rebuilt. dw is skipped when the weight does not require grad.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float32, or float64 when it already is (tests check in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    round_normed: bool,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [rows, D] in ``out_dtype``, rstd [rows] float32 or float64) for a 2-D ``x``: the PyTorch reference; y
    copied into ``out`` if given."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # [rows]
    n = xf * rstd[:, None]
    if round_normed:
        n = n.to(x.dtype).to(xf.dtype)
    y = (n * (_acc(weight) + offset)).to(out_dtype)
    return (y if out is None else out.copy_(y)), rstd


def rms_norm_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    round_normed: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx like x, dweight like weight or None): the PyTorch reference of the backward."""
    xf, g = _acc(x), _acc(dy)
    n = xf * rstd[:, None]
    gw = g * (_acc(weight) + offset)
    dx = rstd[:, None] * (gw - n * (gw * n).mean(-1, keepdim=True))
    dw = None
    if need_dweight:
        nw = n.to(x.dtype).to(n.dtype) if round_normed else n
        dw = (g * nw).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


def _impl(x: torch.Tensor):
    if use_triton(x):
        from .triton import rmsnorm

        return rmsnorm.rms_norm_forward, rmsnorm.rms_norm_backward
    return rms_norm_forward_ref, rms_norm_backward_ref


class RMSNormFunction(torch.autograd.Function):
    """y = x · rstd · (w + offset) over the last dim, with the fused backward above."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, round_normed, out_dtype, spare_cols):
        fwd, bwd = _impl(x)
        x2 = x.reshape(-1, x.shape[-1])
        out = None
        if spare_cols:
            wide = torch.empty((x2.shape[0], x2.shape[1] + spare_cols), dtype=out_dtype, device=x.device)
            wide.kbit_spare_from = x2.shape[1]  # the columns from here on are scratch (kbit.lora.grouped fills them)
            out = wide[:, : x2.shape[1]]
        y, rstd = fwd(x2, weight, eps, offset, round_normed, out_dtype, out=out)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.bwd, ctx.offset, ctx.round_normed = bwd, offset, round_normed
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dw = ctx.bwd(dy2, x2, weight, rstd, ctx.offset, ctx.round_normed, need_dw)
        return dx.view(dy.shape), dw, None, None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    round_normed: bool = False,
    out_dtype: torch.dtype | None = None,
    spare_cols: int = 0,
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim times ``weight + offset``; Triton on CUDA, PyTorch elsewhere. With
    ``spare_cols`` the result is the first columns of a buffer that many columns wider, the rest scratch space
    (marked ``kbit_spare_from`` on the buffer) that a grouped LoRA node fills instead of copying the result."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but the weight {weight.shape[-1]}")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), round_normed, out_dtype or x.dtype, spare_cols)
