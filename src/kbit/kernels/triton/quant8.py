"""Triton kernels for blockwise dynamic 8-bit quantization, bit-identical to the reference in
:mod:`kbit.quant.blockwise8`.

The code of a scaled value is ``lut[trunc(fma((s + 1) / 2, 65535, 0.5))]``: the 65,536-entry table
(:func:`kbit.quant.codebooks.lut_8bit`, 64 KB, cache resident) is gathered by the kernel, which is what
makes the result equal to bitsandbytes' CPU backend rather than its CUDA binary search. A program handles a
[rows, blocksize] tile (rows = whole blocks), so the block max is a row reduction and the scale a per-row
vector.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.codebooks import lut_8bit
from .rounding import abs_max_rows, add_rn, div_rn, fma_rn, mul_rn, round_to

ELEMS = 4096  # elements per program (at least one block)
WARPS = 8


@triton.jit
def _quantize_blockwise_kernel(x_ptr, lut_ptr, q_ptr, absmax_ptr, n, nblocks, BS: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * R + tl.arange(0, R)  # [R]
    offs = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [R, BS]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    am = abs_max_rows(x)  # [R]; padding zeros never raise it
    tl.store(absmax_ptr + blk, am, mask=blk < nblocks)
    zero = am == 0.0
    one = tl.full([R], 1.0, tl.float32)
    inv = tl.where(zero, 0.0, div_rn(one, tl.where(zero, one, am)))  # IEEE reciprocal; zero blocks get code 0
    s = mul_rn(x, tl.broadcast_to(inv[:, None], (R, BS)))
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    # bin = trunc(fma((s + 1) * 0.5, 65535, 0.5)): s + 1 rounds once, * 0.5 is exact, the fma rounds once.
    h = mul_rn(add_rn(s, tl.full([R, BS], 1.0, tl.float32)), tl.full([R, BS], 0.5, tl.float32))
    bins = fma_rn(h, tl.full([R, BS], 65535.0, tl.float32), tl.full([R, BS], 0.5, tl.float32)).to(tl.int32)
    q = tl.load(lut_ptr + bins)
    q = tl.where(zero[:, None], 0, q).to(tl.uint8)
    tl.store(q_ptr + offs, q, mask=mask)


@triton.jit
def _dequantize_blockwise_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr, n, BS: tl.constexpr, ROW: tl.constexpr, ELEMS: tl.constexpr
):
    R: tl.constexpr = ELEMS // ROW
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * ELEMS + tl.arange(0, R) * ROW  # [R]; a row lies inside one block
    offs = row_start[:, None] + tl.arange(0, ROW)[None, :]
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    am = tl.load(absmax_ptr + row_start // BS, mask=row_start < n, other=0.0)
    v = mul_rn(tl.load(code_ptr + q), tl.broadcast_to(am[:, None], (R, ROW)))
    tl.store(out_ptr + offs, round_to(v, out_ptr.dtype.element_ty), mask=mask)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize CUDA ``x`` to 8-bit codes of ``code`` per block: (q uint8 shaped like x, absmax fp32)."""
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    # lut_8bit builds the table once per code (cached by value); each call still copies the code to the host
    # and the 64 KB table to the device, negligible beside an optimizer step's traffic.
    lut = lut_8bit(code, x.device)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = max(1, ELEMS // blocksize)
    _quantize_blockwise_kernel[(-(-nblocks // rows),)](
        flat, lut, q, absmax, n, nblocks, BS=blocksize, R=rows, num_warps=WARPS
    )
    return q.reshape(x.shape), absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, rounded to ``out_dtype``, shaped like ``q`` (CUDA)."""
    flat = q.contiguous().reshape(-1)
    n = flat.numel()
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    row = min(blocksize, ELEMS)
    _dequantize_blockwise_kernel[(-(-n // ELEMS),)](
        flat,
        absmax.to(q.device, torch.float32),
        code.to(q.device, torch.float32),
        out,
        n,
        BS=blocksize,
        ROW=row,
        ELEMS=ELEMS,
        num_warps=WARPS,
    )
    return out
