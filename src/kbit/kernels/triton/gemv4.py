"""Triton kernel for decoding: ``y = x @ dequant(W)^T + b (+ s * (x A^T) B^T)`` for one row of ``x``.

At decode time (one token per sequence) a 4-bit linear is a matrix-vector product bound by reading the packed weight:
half a byte per weight, so a separate dequantize pass (two more bytes written, two read) would cost five times the
traffic. Here each program owns ``BLOCK_N`` output features, streams their packed rows once, one quantization block
at a time, rebuilds each weight exactly as :func:`kbit.quant.dequantize_4bit` does (table value times the block scale
in float32, double-quantized scales rebuilt in the same pass, then rounded to the compute dtype) and multiplies it
with ``x`` in float32. Weights are the same values the training path multiplies; only the summation order differs.

The LoRA branch is folded into the epilogue: the caller computes ``xa = x A^T`` ([rows, r], one small matmul shared
by every program) and each program adds ``s * xa B[n]^T`` for its features before the single rounding, so an adapter
costs one extra launch instead of three and no extra pass over the output.

One row only: a tensor-core variant for 2-16 rows was several times slower than dequantize-then-matmul on the H100
(bench/RESULTS.md), so :func:`kbit.kernels.dispatch.gemv_4bit` takes that path for more rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.state import QuantState
from .rounding import add_rn, mul_rn, round_to

# (BLOCK_N, blocks per iteration, num_warps, num_stages), picked on the H100 by bench/generate.py --sweep.
CONFIG = (16, 8, 4, 2)


@triton.jit
def _gemv4_kernel(
    x_ptr,  # [K] compute dtype
    bytes_ptr,  # [N * K / 2] uint8: element 2i in the high nibble of byte i
    absmax_ptr,  # fp32 [N * K / BS], or uint8 codes under double quant
    code_ptr,  # [16] fp32 table
    nested_ptr,  # fp32 nested scales (double quant only)
    code8_ptr,  # [256] fp32 nested map (double quant only)
    offset_ptr,  # fp32 scalar (double quant only)
    bias_ptr,  # [N] or unused
    xa_ptr,  # [R] x A^T (LoRA) or unused
    lb_ptr,  # [N, R] LoRA B or unused
    out_ptr,  # [N]
    N,
    K,
    R,
    lora_scale,
    BS: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,  # quantization blocks per row per iteration
    RP: tl.constexpr,  # LoRA rank padded to a power of two
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
):
    # Tiles are [features, blocks, bytes of a block]: a block's scale broadcasts along the last axis and the high and
    # low nibbles (even and odd k) stay separate tiles, so nothing is reshaped or interleaved.
    HB: tl.constexpr = BS // 2
    pid = tl.program_id(0).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    nmask = n < N
    KB = K // BS
    t = tl.arange(0, HB)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kb0 in range(0, KB, NB):
        kb = kb0 + tl.arange(0, NB)  # [NB] block index within the row
        bmask = kb < KB
        boff = n[:, None, None] * (K // 2) + kb[None, :, None] * HB + t[None, None, :]
        byte = tl.load(bytes_ptr + boff, mask=nmask[:, None, None] & bmask[None, :, None], other=0).to(tl.int32)
        ab = n[:, None] * KB + kb[None, :]  # [BN, NB] global block indices
        amask = nmask[:, None] & bmask[None, :]
        if NESTED:
            q8 = tl.load(absmax_ptr + ab, mask=amask, other=0).to(tl.int32)
            c8 = tl.load(code8_ptr + q8)
            nested = tl.load(nested_ptr + ab // NESTED_BS, mask=amask, other=0.0)
            offset = tl.load(offset_ptr + tl.zeros([BLOCK_N, NB], tl.int32))
            am = add_rn(mul_rn(c8, nested), offset)  # two roundings, like the reference
        else:
            am = tl.load(absmax_ptr + ab, mask=amask, other=0.0)
        amb = tl.broadcast_to(am[:, :, None], (BLOCK_N, NB, HB))
        w_even = round_to(mul_rn(tl.load(code_ptr + (byte >> 4)), amb), dt)  # the dequantizer's values
        w_odd = round_to(mul_rn(tl.load(code_ptr + (byte & 15)), amb), dt)
        xk = kb[:, None] * BS + 2 * t[None, :]  # [NB, HB] even k
        xe = tl.load(x_ptr + xk, mask=bmask[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + xk + 1, mask=bmask[:, None], other=0.0).to(tl.float32)
        part = w_even.to(tl.float32) * xe[None, :, :] + w_odd.to(tl.float32) * xo[None, :, :]
        acc += tl.sum(tl.sum(part, axis=2), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_LORA:
        r = tl.arange(0, RP)
        xa = tl.load(xa_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + n[:, None] * R + r[None, :], mask=nmask[:, None] & (r[None, :] < R), other=0.0)
        acc += lora_scale * tl.sum(lb.to(tl.float32) * xa[None, :], axis=1)
    tl.store(out_ptr + n, round_to(acc, out_ptr.dtype.element_ty), mask=nmask)


def supports(state: QuantState, k: int) -> bool:
    """True when the kernel handles this weight: whole blocks per row (no block straddles two rows)."""
    return k % state.blocksize == 0 and state.blocksize >= 32


def gemv_4bit(
    x: torch.Tensor,
    raw: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``x [1, K] @ dequant(W)^T + bias + lora_scale * xa @ lora_b^T`` on CUDA, in ``x.dtype``."""
    if x.shape[0] != 1:
        raise ValueError(f"gemv_4bit takes one row, got {x.shape[0]}")
    k = x.shape[1]
    n = state.shape[0]
    x = x.contiguous()
    raw = raw.reshape(-1)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    code = state.code if state.code.dtype == torch.float32 else state.code.float()
    if state.nested:
        extra = (state.nested_absmax, state.nested_code, state.offset)
        nested_bs = state.nested_blocksize
    else:
        extra = (code, code, code)  # unused pointers
        nested_bs = 1
    bn, nb, warps, stages = config or CONFIG
    nb = max(1, nb * 64 // state.blocksize)  # tuned at blocksize 64: keep the bytes per iteration
    has_lora = xa is not None
    rank = lora_b.shape[1] if has_lora else 1
    _gemv4_kernel[(triton.cdiv(n, bn),)](
        x,
        raw,
        state.absmax,
        code,
        *extra,
        bias if bias is not None else out,
        xa.contiguous() if has_lora else out,
        lora_b.contiguous() if has_lora else out,
        out,
        n,
        k,
        rank,
        float(lora_scale),
        BS=state.blocksize,
        NESTED=state.nested,
        NESTED_BS=nested_bs,
        BLOCK_N=bn,
        NB=nb,
        RP=triton.next_power_of_2(rank),
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        num_warps=warps,
        num_stages=stages,
    )
    return out
