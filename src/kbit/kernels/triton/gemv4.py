"""Triton kernel for decoding: ``y = x @ dequant(W)^T + b (+ s * (x A^T) B^T) (+ residual)`` for one row of ``x``.

At decode time (one token per sequence) a 4-bit linear is a matrix-vector product bound by reading the packed weight:
half a byte per weight, so a separate dequantize pass (two more bytes written, two read) would cost five times the
traffic. Here each program owns ``BLOCK_N`` output features and streams their packed rows once, a tile of
quantization blocks at a time (the next tile's loads issued before this one is reduced); double-quantized scales
are rebuilt in the same pass exactly as :func:`kbit.quant.dequantize_4bit` rebuilds them.

Arithmetic modes. LUT (the default) reads the codes as 32-bit words and looks all eight up in registers with byte
permutes (PRMT, inline PTX) from a table of bfloat16-rounded codes, sums ``code * x`` over a block in float32 and
multiplies the sum by the block's scale: 23% faster than FACTORED over the three Llama-3-8B shapes on the H100
(bench/RESULTS.md); like bitsandbytes' GEMV it multiplies bfloat16 codes (up to 2^-8 relative per code). FACTORED
does the same with float32 codes gathered from memory (two gathers per byte), so it differs from the bf16 weights
the dequantizer writes by at most their rounding (2^-9 relative). EXACT rebuilds each weight as the dequantizer does
(rounded to the compute dtype) and differs from dequantize-then-matmul only in summation order. PROBE skips the
table (wrong values): ``bench/generate.py --sweep`` uses it to show what the tiling alone could reach.

The LoRA branch is folded into the epilogue: the caller computes ``xa = x A^T`` ([rows, r], one small matmul shared
by every program) and each program adds ``s * xa B[n]^T`` for its features before the rounding, so an adapter costs
one extra launch instead of three and no extra pass over the output. A residual, when given, is added after that
rounding, as a separate addition would add it, which saves the decoder one launch per projection.

One row only here: a tensor-core variant for 2-16 rows was several times slower than dequantize-then-matmul on the
H100 (bench/RESULTS.md). On Hopper and newer, :func:`gemv_4bit` hands bfloat16 rows (one to four) to
:mod:`.gemv4_smem` (Gluon: the codes looked up in a shared-memory table, 1.5x this kernel at one row); these kernels
stay the path elsewhere and the reference for its tests.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from ...quant.state import QuantState
from .rounding import add_rn, mul_rn, round_to

log = logging.getLogger("kbit")
# The Gluon kernel's state: None until its first call compiles and runs, then True; False once it failed to compile
# (another Triton's Gluon API): this kernel takes over for good, said once in the log.
_SMEM_STATE: dict[str, bool | None] = {"ok": None}
EXACT, FACTORED, PROBE, LUT = 0, 1, 2, 3  # arithmetic modes (module docstring)
ROWS = 4  # LUT's arithmetic, tiled by whole rows with x loaded once per program: config (RT, ITERS, warps, 1, ROWS)
# Triton's interpreter (CPU tests) runs no PTX: LUT mode then gathers the same values from a float32 table.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, blocks per iteration, num_warps, num_stages, mode): the best tiling summed over the three Llama-3-8B
# shapes in bench/generate.py --sweep on the H100: LUT 68.5 us, FACTORED's best (8, 8, 2, 1) 89.1, EXACT's 100.7.
CONFIG = (8, 16, 4, 1, LUT)


@triton.jit
def _block_scales(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb, bmask, KB, BLOCK_N: tl.constexpr,
                  NB: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr):  # fmt: skip
    """Float32 scales [BN, NB] of blocks ``kb`` of features ``n`` (rebuilt from double quantization if NESTED)."""
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
    return am


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
    am = _block_scales(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb, bmask, KB, BLOCK_N, NB, NESTED,
                       NESTED_BS)  # fmt: skip
    return byte, xw, am


@triton.jit
def _x_pair(xw, X_BF16: tl.constexpr):
    """The two 16-bit elements of x words as float32: (element 2i, element 2i + 1)."""
    if X_BF16:  # a bfloat16 is the top half of the float32 with the same value
        return (xw << 16).to(tl.float32, bitcast=True), (xw & -65536).to(tl.float32, bitcast=True)
    lo = (xw & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _tile_sum(byte, xw, am, code_ptr, dt: tl.constexpr, X_BF16: tl.constexpr, MODE: tl.constexpr):
    """Sum over a tile's blocks of weight times x, per feature: [BN] float32."""
    x_even, x_odd = _x_pair(xw, X_BF16)
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
def _load_words(x_ptr, words_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb0, KW, KB,
                WPB: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, NESTED: tl.constexpr,
                NESTED_BS: tl.constexpr):  # fmt: skip
    """Packed words [BN, NB, WPB] (8 codes each), the x words holding each word's elements 2i, 2i+1 ([NB, WPB]
    for i = 0..3) and block scales [BN, NB] of blocks kb0 .. kb0 + NB."""
    t = tl.arange(0, WPB)
    kb = kb0 + tl.arange(0, NB)
    bmask = kb < KB
    woff = n[:, None, None] * KW + kb[None, :, None] * WPB + t[None, None, :]
    q = tl.load(words_ptr + woff, mask=nmask[:, None, None] & bmask[None, :, None], other=0)
    # x: four words (elements 8w .. 8w + 7) per packed word, loaded as one contiguous run and split in registers
    # (four strided loads instead measured 9% slower over the three 8B shapes).
    xr = kb[:, None, None] * (WPB * 4) + t[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    xw = tl.load(x_ptr + xr, mask=bmask[:, None, None], other=0)
    x02, x13 = tl.split(tl.reshape(xw, (NB, WPB, 2, 2)))  # split takes the last axis: words 0, 2 and 1, 3
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    x0, x1, x2, x3 = x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :]
    am = _block_scales(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb, bmask, KB, BLOCK_N, NB, NESTED,
                       NESTED_BS)  # fmt: skip
    return q, x0, x1, x2, x3, am


# Eight table lookups per 32-bit word of codes in registers, four per PRMT. The 16-entry table is two byte planes
# (low and high byte of each entry's bfloat16) of four registers each ($9..$12, $13..$16). For four codes at once, a
# PRMT picks bytes from entries 0-7 and one from entries 8-15 (the selector's 3 low bits of each nibble), a third
# PRMT keeps one or the other per byte (bit 3 of the code); a last PRMT per code puts its two bytes in the top half
# of a float32 and fills the bottom half with the sign bit (selector nibbles 8-15 replicate a byte's top bit): 0 for
# a positive code; all ones for a negative one, whose table entry is one bfloat16 step smaller in magnitude, so the
# value is the bfloat16 code to 2^-16 of a step either way (lut_table). Byte i of the word holds codes 2i (high
# nibble) and 2i+1, so the selector nibbles read the codes in the order 1, 0, 3, 2. Every input is read before the
# first output is written (outputs may share their registers).
_LUT_ASM = tl.constexpr("""{
.reg .b32 s0, s1, t0, t1, u, a, b, lo0, hi0, lo1, hi1;
and.b32 s0, $8, 0x7777;
shr.u32 t0, $8, 1;
and.b32 t0, t0, 0x4444;
or.b32 t0, t0, 0x3210;
shr.u32 u, $8, 16;
and.b32 s1, u, 0x7777;
shr.u32 t1, u, 1;
and.b32 t1, t1, 0x4444;
or.b32 t1, t1, 0x3210;
prmt.b32 a, $9, $10, s0;
prmt.b32 b, $11, $12, s0;
prmt.b32 lo0, a, b, t0;
prmt.b32 a, $13, $14, s0;
prmt.b32 b, $15, $16, s0;
prmt.b32 hi0, a, b, t0;
prmt.b32 a, $9, $10, s1;
prmt.b32 b, $11, $12, s1;
prmt.b32 lo1, a, b, t1;
prmt.b32 a, $13, $14, s1;
prmt.b32 b, $15, $16, s1;
prmt.b32 hi1, a, b, t1;
prmt.b32 $0, lo0, hi0, 0x51DD;
prmt.b32 $1, lo0, hi0, 0x40CC;
prmt.b32 $2, lo0, hi0, 0x73FF;
prmt.b32 $3, lo0, hi0, 0x62EE;
prmt.b32 $4, lo1, hi1, 0x51DD;
prmt.b32 $5, lo1, hi1, 0x40CC;
prmt.b32 $6, lo1, hi1, 0x73FF;
prmt.b32 $7, lo1, hi1, 0x62EE;
}""")


@triton.jit
def _tile_sum_lut(q, x0, x1, x2, x3, am, lut_ptr, X_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """LUT mode: sum over a tile's blocks of code times x (bfloat16 codes, float32 sums) times the block scale."""
    if USE_ASM:
        planes = lut_ptr + 16  # eight int32 words after the 16-entry float32 table
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _LUT_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            [q, tl.load(planes).to(tl.int32, bitcast=True), tl.load(planes + 1).to(tl.int32, bitcast=True),
             tl.load(planes + 2).to(tl.int32, bitcast=True), tl.load(planes + 3).to(tl.int32, bitcast=True),
             tl.load(planes + 4).to(tl.int32, bitcast=True), tl.load(planes + 5).to(tl.int32, bitcast=True),
             tl.load(planes + 6).to(tl.int32, bitcast=True), tl.load(planes + 7).to(tl.int32, bitcast=True)],
            dtype=(tl.int32,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
        # float32 results leave PTX through 32-bit integer registers ("=r"; LLVM gives "f" only to float32 types)
        v0, v1 = v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True)
        v2, v3 = v2.to(tl.float32, bitcast=True), v3.to(tl.float32, bitcast=True)
        v4, v5 = v4.to(tl.float32, bitcast=True), v5.to(tl.float32, bitcast=True)
        v6, v7 = v6.to(tl.float32, bitcast=True), v7.to(tl.float32, bitcast=True)
    else:  # the same float32 values from the table (code 2i in the high nibble of byte i)
        v0 = tl.load(lut_ptr + ((q >> 4) & 15))
        v1 = tl.load(lut_ptr + (q & 15))
        v2 = tl.load(lut_ptr + ((q >> 12) & 15))
        v3 = tl.load(lut_ptr + ((q >> 8) & 15))
        v4 = tl.load(lut_ptr + ((q >> 20) & 15))
        v5 = tl.load(lut_ptr + ((q >> 16) & 15))
        v6 = tl.load(lut_ptr + ((q >> 28) & 15))
        v7 = tl.load(lut_ptr + ((q >> 24) & 15))
    e0, o0 = _x_pair(x0, X_BF16)
    e1, o1 = _x_pair(x1, X_BF16)
    e2, o2 = _x_pair(x2, X_BF16)
    e3, o3 = _x_pair(x3, X_BF16)
    s = v0 * e0 + v1 * o0 + v2 * e1 + v3 * o1
    s += v4 * e2 + v5 * o2 + v6 * e3 + v7 * o3
    return tl.sum(am * tl.sum(s, axis=2), axis=1)


@triton.jit
def _gemv4_kernel(
    x_ptr,  # [K / 2] int32: the compute-dtype row, two elements per word (element 2i in the low half)
    bytes_ptr,  # [N * K / 2] uint8: element 2i in the high nibble of byte i
    absmax_ptr,  # fp32 [N * K / BS], or uint8 codes under double quant
    code_ptr,  # [16] float32 code table; LUT mode: the bfloat16-code table then its eight byte-plane words
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
    KW,  # K / 8: 32-bit words per row (LUT mode; passed so that Triton knows its divisibility)
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
    USE_ASM: tl.constexpr,  # LUT mode's lookups in PTX (False under Triton's interpreter)
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
    if MODE == 3:  # bytes_ptr holds int32 words: 8 codes each, BS // 8 words per block
        WPB: tl.constexpr = BS // 8
        q, x0, x1, x2, x3, am = _load_words(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n,
                                            nmask, 0, KW, KB, WPB, NB, BLOCK_N, NESTED, NESTED_BS)  # fmt: skip
        for kb0 in range(NB, KB + NB, NB):
            nq, nx0, nx1, nx2, nx3, nam = _load_words(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr,
                                                      offset_ptr, n, nmask, kb0, KW, KB, WPB, NB, BLOCK_N, NESTED,
                                                      NESTED_BS)  # fmt: skip
            y += _tile_sum_lut(q, x0, x1, x2, x3, am, code_ptr, X_BF16, USE_ASM)
            q, x0, x1, x2, x3, am = nq, nx0, nx1, nx2, nx3, nam
    else:
        byte, xw, am = _load_tile(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, 0,
                                  KH, KB, HB, NB, BLOCK_N, NESTED, NESTED_BS)  # fmt: skip
        for kb0 in range(NB, KB + NB, NB):  # the last load is fully masked: no traffic
            nbyte, nxw, nam = _load_tile(x_ptr, bytes_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n,
                                         nmask, kb0, KH, KB, HB, NB, BLOCK_N, NESTED, NESTED_BS)  # fmt: skip
            y += _tile_sum(byte, xw, am, code_ptr, dt, X_BF16, MODE)
            byte, xw, am = nbyte, nxw, nam
    _epilogue(y, n, nmask, bias_ptr, xa_ptr, lb_ptr, res_ptr, out_ptr, R, XS, XA_STRIDE, lora_scale, RP, XSP,
              HAS_BIAS, HAS_LORA, HAS_RES)  # fmt: skip


@triton.jit
def _epilogue(y, n, nmask, bias_ptr, xa_ptr, lb_ptr, res_ptr, out_ptr, R, XS, XA_STRIDE, lora_scale, RP: tl.constexpr,
              XSP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RES: tl.constexpr):  # fmt: skip
    """Features ``n``'s sums ``y`` (float32) + bias + LoRA, rounded, + residual, stored in the output's dtype."""
    dt = out_ptr.dtype.element_ty
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


@triton.jit
def _gemv4_rows_kernel(
    x_ptr, words_ptr, absmax_ptr, code_ptr, nested_ptr, code8_ptr, offset_ptr, bias_ptr, xa_ptr, lb_ptr, res_ptr,
    out_ptr, N, KW, R, XS, XA_STRIDE, lora_scale, BS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
    RT: tl.constexpr, ITERS: tl.constexpr, KBP: tl.constexpr, RP: tl.constexpr, XSP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RES: tl.constexpr, X_BF16: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    # ROWS mode: each program streams ITERS groups of RT whole rows (every block of K at once, KBP >= K / BS
    # blocks) with x loaded once into registers before the loop, in the layout every row's tile uses: no x reloads
    # per tile and no layout conversion inside the loop. The next group's words are loaded before this one is summed.
    WPB: tl.constexpr = BS // 8
    KB = KW // WPB
    kb = tl.arange(0, KBP)
    bmask = kb < KB
    t = tl.arange(0, WPB)
    xr = kb[:, None, None] * (WPB * 4) + t[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    xw = tl.load(x_ptr + xr, mask=bmask[:, None, None], other=0)
    x02, x13 = tl.split(tl.reshape(xw, (KBP, WPB, 2, 2)))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    x0, x1, x2, x3 = x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :]
    first = tl.program_id(0).to(tl.int64) * (ITERS * RT)
    n = first + tl.arange(0, RT)
    nmask = n < N
    woff = n[:, None, None] * KW + kb[None, :, None] * WPB + t[None, None, :]
    q = tl.load(words_ptr + woff, mask=nmask[:, None, None] & bmask[None, :, None], other=0)
    am = _block_scales(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, n, nmask, kb, bmask, KB, RT, KBP, NESTED,
                       NESTED_BS)  # fmt: skip
    for it in range(1, ITERS + 1):
        nn = first + it * RT + tl.arange(0, RT)
        nnmask = (nn < N) & (it < ITERS)
        noff = nn[:, None, None] * KW + kb[None, :, None] * WPB + t[None, None, :]
        nq = tl.load(words_ptr + noff, mask=nnmask[:, None, None] & bmask[None, :, None], other=0)
        nam = _block_scales(absmax_ptr, nested_ptr, code8_ptr, offset_ptr, nn, nnmask, kb, bmask, KB, RT, KBP,
                            NESTED, NESTED_BS)  # fmt: skip
        y = _tile_sum_lut(q, x0, x1, x2, x3, am, code_ptr, X_BF16, USE_ASM)
        _epilogue(y, n, nmask, bias_ptr, xa_ptr, lb_ptr, res_ptr, out_ptr, R, XS, XA_STRIDE, lora_scale, RP, XSP,
                  HAS_BIAS, HAS_LORA, HAS_RES)  # fmt: skip
        q, am, n, nmask = nq, nam, nn, nnmask


def lut_table(code: torch.Tensor, build: bool = True) -> torch.Tensor | None:
    """LUT mode's table for a 16-entry code table, built on its device (no host sync, so a CUDA graph may be
    captured later) and cached: the 16 float32 values the kernel multiplies (each the bfloat16-rounded code, to
    2^-16 of a bfloat16 step), then the 8 byte-plane words its PRMT lookups index (low bytes of entries 0-15, then
    high bytes)."""
    lut = getattr(code, "_kbit_lut", None)  # kept on the code tensor: lives and dies with the quant state
    if lut is None and build:
        b = code.to(torch.float32).to(torch.bfloat16)
        b = torch.where(b == 0, torch.zeros_like(b), b)  # -0.0 as +0.0 (its bits minus one would be a NaN)
        bits = b.view(torch.int16).to(torch.int32) & 0xFFFF
        neg = bits >= 0x8000
        bits = bits - neg.to(torch.int32)  # one step smaller in magnitude: the kernel fills the low half with ones
        h = bits.to(torch.int16).view(torch.uint8).reshape(16, 2)  # little-endian: [low byte, high byte]
        fill = (neg.to(torch.uint8) * 255).reshape(16, 1).expand(16, 2)
        values = torch.cat([fill, h], dim=1).reshape(-1)  # the float32 the kernel builds: [fill, fill, lo, hi]
        planes = torch.cat([h[:, 0], h[:, 1]])  # 32 bytes: entry c's low byte at c, high byte at 16 + c
        lut = code._kbit_lut = torch.cat([values, planes]).view(torch.float32)  # [24] words
    return lut


def nested_args(state: QuantState) -> tuple[tuple[torch.Tensor, ...], int]:
    """The GEMV kernels' double-quantization arguments: (nested scales, nested code, offset) and the nested block
    size, or unused pointers and 1 when the scales are plain float32."""
    if state.nested:
        return (state.nested_absmax, state.nested_code, state.offset), state.nested_blocksize
    return (state.absmax, state.absmax, state.absmax), 1


def rows_supported(x: torch.Tensor, raw: torch.Tensor, state: QuantState) -> bool:
    """True when :func:`gemv_4bit` takes this many rows of x in one pass over the weight (the shared-memory-table
    kernel, up to its MAX_ROWS); one row always."""
    if x.shape[0] == 1:
        return True
    if not _smem_path(x, raw.reshape(-1), state):
        return False
    from . import gemv4_smem

    return x.shape[0] <= gemv4_smem.MAX_ROWS


def _smem_path(x: torch.Tensor, raw: torch.Tensor, state: QuantState) -> bool:
    """True when the shared-memory-table kernel (gemv4_smem, Gluon) takes this call: a Hopper or newer GPU, a
    bfloat16 row, word-aligned codes, blocks of a multiple of 32, a Triton with Gluon, and (while a CUDA graph is
    being captured) a table already built. ``KBIT_GEMV_SMEM=0`` turns it off."""
    if os.environ.get("KBIT_GEMV_SMEM", "1") == "0" or _INTERPRETED or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if _SMEM_STATE["ok"] is False:
        return False
    if raw.data_ptr() % 4 or state.blocksize % 32 or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    try:
        from . import gemv4_smem
    except ImportError:  # a Triton without Gluon (or another Gluon API)
        return False
    capturing = torch.cuda.is_current_stream_capturing()
    return not capturing or gemv4_smem.smem_table(state.code, build=False) is not None


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
    if x.shape[0] != 1 and not (config is None and rows_supported(x, raw, state)):
        raise ValueError(f"gemv_4bit takes one row (up to 4 on Hopper with bfloat16), got {x.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemv_4bit takes a bfloat16 or float16 row, got {x.dtype}")
    k = x.shape[1]
    n = state.shape[0]
    x = x.contiguous() if x.storage_offset() % 2 == 0 else x.clone()  # read as 32-bit words
    raw = raw.reshape(-1)
    if config is None and _smem_path(x, raw, state):
        from . import gemv4_smem

        if _SMEM_STATE["ok"]:
            return gemv4_smem.gemv_4bit(x, raw, state, bias, xa, lora_b, lora_scale, residual)
        try:  # the first call compiles the Gluon kernel
            y = gemv4_smem.gemv_4bit(x, raw, state, bias, xa, lora_b, lora_scale, residual)
            _SMEM_STATE["ok"] = True
            return y
        except Exception as e:  # noqa: BLE001 - any compile failure of an experimental dialect: fall back, once
            _SMEM_STATE["ok"] = False
            log.warning("kbit: the Gluon GEMV does not compile with Triton %s (%s); using the Triton GEMV",
                        triton.__version__, type(e).__name__)  # fmt: skip
            if x.shape[0] != 1:  # more rows: dequantize and multiply, as the dispatcher now will
                from .. import dispatch

                return dispatch.gemv_4bit(x, raw, state, bias, xa, lora_b, lora_scale, residual)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    code = state.code if state.code.dtype == torch.float32 else state.code.float()
    extra, nested_bs = nested_args(state)
    bn, nb, warps, stages, mode = config or CONFIG
    rows_mode = mode == ROWS
    if rows_mode:  # (RT, ITERS): rows per group, groups per program
        mode = LUT
    else:
        nb = max(1, nb * 64 // state.blocksize)  # tuned at blocksize 64: keep the bytes per iteration
    if mode == LUT:
        # The codes are read as 32-bit words; the table is built by kernels, which a CUDA graph capture must not
        # record (its memory would belong to the graph): a weight first seen while capturing takes FACTORED.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        unbuilt = capturing and lut_table(state.code, build=False) is None
        if raw.data_ptr() % 4 or unbuilt:
            mode = FACTORED
        else:
            raw, code = raw.view(torch.int32), lut_table(state.code)
    has_lora = xa is not None
    rank = lora_b.shape[1] if has_lora else 1
    if has_lora and xa.stride(1) != 1:
        xa = xa.contiguous()
    parts = xa.shape[0] if has_lora else 1
    if rows_mode and mode == LUT:
        _gemv4_rows_kernel[(triton.cdiv(n, bn * nb),)](
            x.view(torch.int32), raw, state.absmax, code, *extra, bias if bias is not None else out,
            xa if has_lora else out, lora_b.contiguous() if has_lora else out,
            residual.contiguous() if residual is not None else out, out, n, k // 8, rank, parts,
            xa.stride(0) if has_lora else 0, float(lora_scale), BS=state.blocksize, NESTED=state.nested,
            NESTED_BS=nested_bs, RT=bn, ITERS=nb, KBP=triton.next_power_of_2(k // state.blocksize),
            RP=triton.next_power_of_2(rank), XSP=triton.next_power_of_2(parts), HAS_BIAS=bias is not None,
            HAS_LORA=has_lora, HAS_RES=residual is not None, X_BF16=x.dtype == torch.bfloat16, USE_ASM=not _INTERPRETED,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return out
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
        k // 8,
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
        USE_ASM=not _INTERPRETED,
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
