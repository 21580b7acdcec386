"""Triton kernel for decoding: ``y = x @ dequant(W)^T + b (+ s * (x A^T) B^T) (+ residual)`` for one row of ``x``.

At decode time (one token per sequence) a 4-bit linear is a matrix-vector product bound by reading the packed weight:
half a byte per weight, so a separate dequantize pass (two more bytes written, two read) would cost five times the
traffic. Here each program owns ``BLOCK_N`` output features and streams their packed rows once, a tile of
quantization blocks at a time (the next tile's loads issued before this one is reduced); double-quantized scales
are rebuilt in the same pass exactly as :func:`kbit.quant.dequantize_4bit` rebuilds them.

Two arithmetic modes. FACTORED (the default) sums ``code[q] * x`` over a block in float32 and multiplies the sum by
the block's scale: one multiply per block instead of a multiply and a rounding per weight, 12% faster on the H100
(bench/RESULTS.md); it multiplies the unrounded weights ``code * scale``, so it differs from the bf16 weights the
dequantizer writes by at most their rounding (2^-9 relative). EXACT rebuilds each weight as the dequantizer does
(rounded to the compute dtype) and differs from dequantize-then-matmul only in summation order. PROBE skips the
table (wrong values): ``bench/generate.py --sweep`` uses it to show what the tiling alone could reach.

The LoRA branch is folded into the epilogue: the caller computes ``xa = x A^T`` ([rows, r], one small matmul shared
by every program) and each program adds ``s * xa B[n]^T`` for its features before the rounding, so an adapter costs
one extra launch instead of three and no extra pass over the output. A residual, when given, is added after that
rounding, as a separate addition would add it, which saves the decoder one launch per projection.

One row only: a tensor-core variant for 2-16 rows was several times slower than dequantize-then-matmul on the H100
(bench/RESULTS.md), so :func:`kbit.kernels.dispatch.gemv_4bit` takes that path for more rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.state import QuantState
from .rounding import add_rn, mul_rn, round_to

EXACT, FACTORED, PROBE = 0, 1, 2  # arithmetic modes (module docstring)
# (BLOCK_N, blocks per iteration, num_warps, num_stages, mode): the best FACTORED tiling summed over the
# three Llama-3-8B shapes in bench/generate.py --sweep on the H100 (EXACT's best there: (8, 8, 2, 1, 0)).
CONFIG = (8, 8, 2, 1, FACTORED)


@triton.jit
def _load_tile(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb0, KH, KB,
               HB: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, NESTED: tl.constexpr,
               NESTED_BS: tl.constexpr):  # fmt: skip
    """Packed bytes [BN, NB, HB], x words [NB, HB] and block scales [BN, NB] of blocks kb0 .. kb0 + NB."""
    t = tl.arange(0, HB)
    kb = kb0 + tl.arange(0, NB)
    bmask = kb < KB
    boff = n[:, None, None] * KH + kb[None, :, None] * HB + t[None, None, :]
    byte = tl.load(bytes_ptr + boff, mask=nmask[:, None, None] & bmask[None, :, None], other=0)
    xw = tl.load(x_ptr + kb[:, None] * HB + t[None, :], mask=bmask[:, None], other=0)
    ab = n[:, None] * KB + kb[None, :]
    amask = nmask[:, None] & bmask[None, :]
    if NESTED:
        q8 = tl.load(absmax_ptr + ab, mask=amask, other=0).to(tl.int32)
        c8 = tl.load(code8_ptr + q8)
        nested = tl.load(nested_ptr + ab // NESTED_BS, mask=amask, other=0.0)
        offset = tl.load(offset_ptr + tl.zeros([BLOCK_N, NB], tl.int32))
        am = add_rn(mul_rn(c8, nested), offset)  # the dequantizer's block scale, rounded as it rounds it
    else:
        am = tl.load(absmax_ptr + ab, mask=amask, other=0.0)
    return byte, xw, am


@triton.jit
def _tile_sum(byte, xw, am, code_ptr, dt: tl.constexpr, X_BF16: tl.constexpr, MODE: tl.constexpr):
    """Sum over a tile's blocks of weight times x, per feature: [BN] float32."""
    if X_BF16:  # a bfloat16 is the top half of the float32 with the same value
        x_even = (xw << 16).to(tl.float32, bitcast=True)
        x_odd = (xw & -65536).to(tl.float32, bitcast=True)
    else:
        x_even = (xw & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_odd = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if MODE == 2:
        part = tl.sum(byte.to(tl.float32) * x_even[None, :, :], axis=2)
    else:
        # Two gathers from the 64-byte code table: every lane of a warp hits the same cache line, so each costs one
        # L1 wavefront (a 256-entry table of pairs spreads a warp over 16 lines and measured slower).
        b32 = byte.to(tl.int32)
        c_even = tl.load(code_ptr + (b32 >> 4))
        c_odd = tl.load(code_ptr + (b32 & 15))
        if MODE == 0:  # the weights the dequantizer writes: code times scale, rounded once to the compute dtype
            amb = am[:, :, None]
            w_even = round_to(mul_rn(c_even, amb), dt).to(tl.float32)
            w_odd = round_to(mul_rn(c_odd, amb), dt).to(tl.float32)
            part = tl.sum(w_even * x_even[None, :, :] + w_odd * x_odd[None, :, :], axis=2)
        else:  # the scale multiplies the block's sum: one multiply per block instead of two per byte
            part = am * tl.sum(c_even * x_even[None, :, :] + c_odd * x_odd[None, :, :], axis=2)
    return tl.sum(part, axis=1)


@triton.jit
def _gemv4_kernel(
    x_ptr,  # [K / 2] int32: the compute-dtype row, two elements per word (element 2i in the low half)
    bytes_ptr,  # [N * K / 2] uint8: element 2i in the high nibble of byte i
    absmax_ptr,  # fp32 [N * K / BS], or uint8 codes under double quant
    code_ptr,  # [16] float32 code table
    nested_ptr,  # fp32 nested scales (double quant only)
    code8_ptr,  # [256] fp32 nested map (double quant only)
    offset_ptr,  # fp32 scalar (double quant only)
    bias_ptr,  # [N] or unused
    xa_ptr,  # [XS, R] partial sums of x A^T (row stride XA_STRIDE), summed here (LoRA) or unused
    lb_ptr,  # [N, R] LoRA B or unused
    res_ptr,  # [N] residual or unused
    out_ptr,  # [N]
    N,
    KH,  # K / 2: bytes per row
    R,
    XS,
    XA_STRIDE,
    lora_scale,
    BS: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,  # quantization blocks per row per iteration
    RP: tl.constexpr,  # LoRA rank padded to a power of two
    XSP: tl.constexpr,  # XS padded to a power of two
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_RES: tl.constexpr,
    X_BF16: tl.constexpr,  # x is bfloat16 (else float16)
    MODE: tl.constexpr,
):
    # Tiles are [features, blocks, bytes of a block]: a block's scale broadcasts along the last axis. x arrives as
    # 32-bit words holding the even/odd pair that matches a byte's two nibbles, so every load is contiguous and
    # nothing is interleaved in registers. The next tile's loads are issued before this one is reduced, to keep
    # more bytes in flight per program.
    HB: tl.constexpr = BS // 2
    dt = out_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    nmask = n < N
    KB = KH // HB
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The next tile is loaded before this one is reduced (the sweep measured 10% over loading each in turn).
    byte, xw, am = _load_tile(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, 0,
                              KH, KB, HB, NB, BLOCK_N, NESTED, NESTED_BS)  # fmt: skip
    for kb0 in range(NB, KB + NB, NB):  # the last load is fully masked: no traffic
        nbyte, nxw, nam = _load_tile(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask,
                                     kb0, KH, KB, HB, NB, BLOCK_N, NESTED, NESTED_BS)  # fmt: skip
        y += _tile_sum(byte, xw, am, code_ptr, dt, X_BF16, MODE)
        byte, xw, am = nbyte, nxw, nam
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_LORA:
        r = tl.arange(0, RP)
        sp = tl.arange(0, XSP)
        xa = tl.load(
            xa_ptr + sp[:, None] * XA_STRIDE + r[None, :], mask=(sp[:, None] < XS) & (r[None, :] < R), other=0.0
        )
        xa = round_to(tl.sum(xa.to(tl.float32), axis=0), dt).to(tl.float32)  # as F.linear(x, A) would round it
        lb = tl.load(lb_ptr + n[:, None] * R + r[None, :], mask=nmask[:, None] & (r[None, :] < R), other=0.0)
        y += lora_scale * tl.sum(lb.to(tl.float32) * xa[None, :], axis=1)
    if HAS_RES:  # round, then add as a separate op would: the residual stream's values do not change
        y = round_to(y, dt).to(tl.float32) + tl.load(res_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, round_to(y, dt), mask=nmask)


def supports(state: QuantState, k: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the kernel handles this weight and input: whole blocks per row (no block straddles two rows),
    a 16-bit compute dtype."""
    return k % state.blocksize == 0 and state.blocksize >= 32 and dtype in (torch.bfloat16, torch.float16)


def gemv_4bit(
    x: torch.Tensor,
    raw: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    residual: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``x [1, K] @ dequant(W)^T + bias + lora_scale * xa @ lora_b^T`` on CUDA, in ``x.dtype``, then
    ``+ residual`` [1, N] as a separate addition would round it. ``xa`` is ``x A^T`` [1, r], or its float32 partial
    sums [S, r] from :func:`lora_down` (summed and rounded here)."""
    if x.shape[0] != 1:
        raise ValueError(f"gemv_4bit takes one row, got {x.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemv_4bit takes a bfloat16 or float16 row, got {x.dtype}")
    k = x.shape[1]
    n = state.shape[0]
    x = x.contiguous() if x.storage_offset() % 2 == 0 else x.clone()  # read as 32-bit words
    raw = raw.reshape(-1)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    code = state.code if state.code.dtype == torch.float32 else state.code.float()
    if state.nested:
        extra = (state.nested_absmax, state.nested_code, state.offset)
        nested_bs = state.nested_blocksize
    else:
        extra = (state.absmax, state.absmax, state.absmax)  # unused pointers
        nested_bs = 1
    bn, nb, warps, stages, mode = config or CONFIG
    nb = max(1, nb * 64 // state.blocksize)  # tuned at blocksize 64: keep the bytes per iteration
    has_lora = xa is not None
    rank = lora_b.shape[1] if has_lora else 1
    if has_lora and xa.stride(1) != 1:
        xa = xa.contiguous()
    parts = xa.shape[0] if has_lora else 1
    _gemv4_kernel[(triton.cdiv(n, bn),)](
        x.view(torch.int32),
        raw,
        state.absmax,
        code,
        *extra,
        bias if bias is not None else out,
        xa if has_lora else out,
        lora_b.contiguous() if has_lora else out,
        residual.contiguous() if residual is not None else out,
        out,
        n,
        k // 2,
        rank,
        parts,
        xa.stride(0) if has_lora else 0,
        float(lora_scale),
        BS=state.blocksize,
        NESTED=state.nested,
        NESTED_BS=nested_bs,
        BLOCK_N=bn,
        NB=nb,
        RP=triton.next_power_of_2(rank),
        XSP=triton.next_power_of_2(parts),
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        HAS_RES=residual is not None,
        X_BF16=x.dtype == torch.bfloat16,
        MODE=mode,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@triton.jit
def _lora_down_kernel(x_ptr, a_ptr, out_ptr, K, R, BK: tl.constexpr):
    # Program (r, s) writes the partial sum of x[k] A[r, k] over the s-th slice of K: every load is issued at once
    # (one latency), with no atomics and no second pass; the GEMV's epilogue adds the slices.
    r = tl.program_id(0)
    s = tl.program_id(1)
    k = s * BK + tl.arange(0, BK)
    km = k < K
    x = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + r.to(tl.int64) * K + k, mask=km, other=0.0).to(tl.float32)
    tl.store(out_ptr + s * R + r, tl.sum(x * a, axis=0))


LORA_DOWN_BK = 1024


def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Float32 partial sums [S, r] of ``x [1, K] @ a [r, K]^T`` over S slices of K, for :func:`gemv_4bit`'s ``xa``.

    cuBLAS spends two launches (split-K matmul + reduction) on this [1, K] x [K, r] product; here it is one."""
    if x.shape[0] != 1 or a.shape[1] != x.shape[1]:
        raise ValueError(f"lora_down takes x [1, K] and A [r, K], got {tuple(x.shape)} and {tuple(a.shape)}")
    k, r = x.shape[1], a.shape[0]
    parts = triton.cdiv(k, LORA_DOWN_BK)
    out = torch.empty((parts, r), dtype=torch.float32, device=x.device)
    _lora_down_kernel[(r, parts)](x.contiguous(), a.contiguous(), out, k, r, BK=LORA_DOWN_BK, num_warps=4)
    return out
