"""Triton rotary embedding, matching :func:`kbit.kernels.rotary.rope_apply_ref` value for value.

A program owns one (batch, position) pair: it loads that position's cos/sin row once and rotates every head
of it as one [heads, D/2] tile, reading x once and writing the output once (the unfused ops read x three
times and write four temporaries). Strides are passed for x and the output, so transformers' transposed
[B, heads, T, D] views need no copy; the backward is the same kernel with the transposed rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    T,
    H,
    HALF,
    xs_b,
    xs_h,
    xs_t,
    os_b,
    os_h,
    os_t,
    cs_b,  # cos/sin batch stride (0 when one table serves the whole batch)
    cs_t,
    H_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    d = tl.arange(0, HALF_BLOCK)
    h = tl.arange(0, H_BLOCK)
    dl = d < HALF
    cbase = b * cs_b + t * cs_t
    c1 = tl.load(cos_ptr + cbase + d, mask=dl, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cbase + HALF + d, mask=dl, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cbase + d, mask=dl, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cbase + HALF + d, mask=dl, other=0.0).to(tl.float32)[None, :]
    live = (h[:, None] < H) & dl[None, :]
    xo = b * xs_b + h[:, None] * xs_h + t * xs_t + d[None, :]  # [H_BLOCK, HALF_BLOCK]
    x1 = tl.load(x_ptr + xo, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=live, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # Each product and sum rounded to the input dtype, as the unfused ops are (a no-op in float32).
    a1 = (x1 * c1).to(dt).to(tl.float32)
    a2 = (x2 * c2).to(dt).to(tl.float32)
    if BACKWARD:
        o1 = a1 + (x2 * s2).to(dt).to(tl.float32)
        o2 = a2 - (x1 * s1).to(dt).to(tl.float32)
    else:
        o1 = a1 - (x2 * s1).to(dt).to(tl.float32)
        o2 = a2 + (x1 * s2).to(dt).to(tl.float32)
    oo = b * os_b + h[:, None] * os_h + t * os_t + d[None, :]
    tl.store(out_ptr + oo, o1.to(dt), mask=live)
    tl.store(out_ptr + oo + HALF, o2.to(dt), mask=live)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B|1, T, D]; the output has x's layout when x is dense."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, H, T, D = x.shape
    out = torch.empty_like(x)  # keeps a dense x's strides (transformers' transposed view)
    cs_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(B * T,)](
        x,
        cos,
        sin,
        out,
        T,
        H,
        D // 2,
        *x.stride()[:3],
        *out.stride()[:3],
        cs_b,
        cos.stride(1),
        H_BLOCK=triton.next_power_of_2(H),
        HALF_BLOCK=triton.next_power_of_2(D // 2),
        BACKWARD=backward,
    )
    return out
