"""Rotary position embedding for q and k with a hand-written backward, in place of transformers'
``apply_rotary_pos_emb``: one autograd op, a PyTorch reference and a Triton kernel behind it.

With x = [x1, x2] split in halves along head_dim and cos = [c1, c2], sin = [s1, s2]:
    out = x·cos + rotate_half(x)·sin = [x1·c1 - x2·s1,  x2·c2 + x1·s2]
    dx  = [g1·c1 + g2·s2,  g2·c2 - g1·s1]
The op saves only cos and sin (shared by every layer), not q and k. Rounding follows the unfused ops (each
product rounded to the input dtype, then the sum), so in bf16 the values equal transformers'.

Layout: q, k are [B, heads, T, D] (any strides with a unit last stride: transformers passes transposed views),
cos, sin are [B or 1, T, D]; the outputs keep q's and k's memory layout.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .norm import _acc


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = t.shape[-1] // 2
    return t[..., :h], t[..., h:]


def rope_apply_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B|1, T, D] (``backward``: apply the transposed rotation)."""
    dt = x.dtype
    c1, c2 = _halves(_acc(cos[:, None]))
    s1, s2 = _halves(_acc(sin[:, None]))
    x1, x2 = _halves(_acc(x))

    def r(t: torch.Tensor) -> torch.Tensor:  # round to the input dtype, as each unfused op does
        return t.to(dt).to(t.dtype)

    if backward:
        o1, o2 = r(r(x1 * c1) + r(x2 * s2)), r(r(x2 * c2) - r(x1 * s1))
    else:
        o1, o2 = r(r(x1 * c1) - r(x2 * s1)), r(r(x2 * c2) + r(x1 * s2))
    return torch.cat([o1, o2], -1).to(dt)


def _impl(x: torch.Tensor):
    if use_triton(x):
        from .triton import rope

        return rope.rope_apply
    return rope_apply_ref


class RotaryFunction(torch.autograd.Function):
    """(q, k) rotated by (cos, sin); gradients for q and k only (the tables are constants)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        apply = _impl(q)
        ctx.save_for_backward(cos, sin)
        ctx.apply_fn = apply
        return apply(q, cos, sin, False), apply(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else ctx.apply_fn(dq, cos, sin, True)
        dk = None if dk is None else ctx.apply_fn(dk, cos, sin, True)
        return dq, dk, None, None


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·cos + rotate_half(q)·sin, same for k) for q, k [B, H, T, D] and cos, sin [B|1, T, D]."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: cos/sin must not require grad (the fused op gives them no gradient)")
    if q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: head_dim {q.shape[-1]} and cos/sin {tuple(cos.shape)} do not match")
    return RotaryFunction.apply(q, k, cos, sin)
