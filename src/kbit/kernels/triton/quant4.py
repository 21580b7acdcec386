"""Triton kernels for blockwise 4-bit (NF4 / FP4) quantization, bit-identical to the reference in
:mod:`kbit.quant.blockwise4`.

Dequantization is pure memory traffic (half a byte in, two bytes out per bf16 weight), so a program streams
a contiguous run of the packed bytes read as int32 words: each word's 8 codes become one row of a [words, 8]
tile that is also the output's row-major layout, so loads and stores are coalesced with no interleaving
step; one scale load per word (a word never straddles a block), one 16-entry table lookup per code. Under
double quantization the block scale is rebuilt in the same pass (``code8[q] * nested_absmax + offset``,
rounded twice like the reference), so there is no second kernel and no float32 scale tensor in memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...quant.codebooks import bounds_4bit
from ...quant.state import QuantState
from .rounding import abs_max_rows, add_rn, div_rn, mul_rn, round_to

TINY_BITS = tl.constexpr(0x006CE3EE)  # float32(1e-38), the clamp the reference applies to scales (subnormal)

# Dequantization tiling, picked on an H100 by bench/dequant.py (int32 words of 8 codes per program, warps).
DEQUANT_WORDS = 1024
DEQUANT_WARPS = 4
DEQUANT_GATHER = True  # table lookups through tl.gather rather than global-memory loads
# Quantization: elements per program (at least one block) and warps.
QUANT_ELEMS = 4096
QUANT_WARPS = 8


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,
    mid_ptr,  # [15] fp32 midpoints of the sorted table
    order_ptr,  # [16] uint8 sorted position -> code (identity for NF4)
    packed_ptr,
    absmax_ptr,
    n,
    nbytes,
    nblocks,
    BS: tl.constexpr,  # quantization blocksize
    R: tl.constexpr,  # blocks (tile rows) per program
    FP4: tl.constexpr,
    HAS_TAIL: tl.constexpr,  # n % BS != 0: the last block is partial and divides instead of multiplying
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * R + tl.arange(0, R)  # [R]
    cols = tl.arange(0, BS)
    offs = blk[:, None] * BS + cols[None, :]  # [R, BS] element indices
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)

    am = abs_max_rows(x)  # [R]; padding zeros never raise it
    tiny = tl.full([R], TINY_BITS, tl.int32).to(tl.float32, bitcast=True)
    amc = tl.where(am < tiny, tiny, am)  # clamp(min=1e-38)
    full = (blk + 1) * BS <= n
    # A full all-zero block stores 0, a partial all-zero tail the clamped 1e-38 (as the reference does).
    tl.store(absmax_ptr + blk, tl.where(full, am, amc), mask=blk < nblocks)

    one = tl.full([R], 1.0, tl.float32)
    inv = div_rn(one, amc)  # IEEE reciprocal, then multiply (full blocks)
    s = mul_rn(x, tl.broadcast_to(inv[:, None], (R, BS)))
    if HAS_TAIL:
        if pid == tl.num_programs(0) - 1:  # only the last program holds the partial block
            part = div_rn(x, tl.broadcast_to(amc[:, None], (R, BS)))
            s = tl.where(full[:, None], s, part)
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)

    # Nearest code = number of midpoints strictly below s (ties go to the lower code, as torch.bucketize).
    pos = tl.zeros([R, BS], dtype=tl.int32)
    for j in tl.static_range(15):
        pos += (s > tl.load(mid_ptr + j)).to(tl.int32)
    if FP4:
        q = tl.load(order_ptr + pos).to(tl.int32)
    else:
        q = pos

    # Element 2k goes to the high nibble of byte k; masked elements are 0.0, whose code odd n pads with.
    hi, lo = tl.split(tl.reshape(q, (R, BS // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boffs = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=boffs < nbytes)


@triton.jit
def _dequantize_4bit_kernel(
    words_ptr,  # [nwords] int32: the packed bytes, 8 codes a word
    absmax_ptr,  # fp32 [nblocks], or uint8 codes under double quant
    code_ptr,  # [16] fp32 table
    nested_ptr,  # fp32 [ceil(nblocks / NESTED_BS)] (double quant only)
    code8_ptr,  # [256] fp32 nested map (double quant only)
    offset_ptr,  # fp32 scalar (double quant only)
    out_ptr,
    n,
    nwords,
    row_words,  # STRIDED: words per row of the weight (its columns / 8: a word never straddles two rows)
    ld,  # STRIDED: the output's row stride in elements
    row0,  # STRIDED: the weight's first row written (the output's row 0)
    BS: tl.constexpr,  # quantization blocksize (>= 32, so a word never straddles two blocks)
    WORDS: tl.constexpr,  # words per program
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    GATHER: tl.constexpr,  # table lookup by tl.gather (True) or by a global-memory load (False)
    STRIDED: tl.constexpr,  # rows written ``ld`` elements apart (into a wider buffer) instead of back to back
):
    if STRIDED:  # a 2-D grid, (row, words of the row): no division, and each row's run stays visibly contiguous
        orow = tl.program_id(0).to(tl.int64)  # the output's row
        row = orow + row0  # the weight's
        cw = tl.program_id(1) * WORDS + tl.arange(0, WORDS)  # [WORDS] words within the row
        w = row * row_words + cw
        live = cw < row_words
    else:
        pid = tl.program_id(0).to(tl.int64)
        w = pid * WORDS + tl.arange(0, WORDS)  # [WORDS]
        live = w < nwords
    word = tl.load(words_ptr + w, mask=live, other=0)
    blk = (w * 8) // BS
    if NESTED:
        q8 = tl.load(absmax_ptr + blk, mask=live, other=0).to(tl.int32)
        c8 = tl.load(code8_ptr + q8)
        nested = tl.load(nested_ptr + blk // NESTED_BS, mask=live, other=0.0)
        offset = tl.load(offset_ptr + tl.zeros([WORDS], tl.int32))  # broadcast the scalar (no arithmetic)
        am = add_rn(mul_rn(c8, nested), offset)  # two roundings, like the reference (never an FMA)
    else:
        am = tl.load(absmax_ptr + blk, mask=live, other=0.0)

    # Little-endian word: element j sits in byte j // 2, in its high nibble when j is even.
    j = tl.arange(0, 8)
    shift = (j // 2) * 8 + (1 - j % 2) * 4
    codes = (word[:, None] >> shift[None, :]) & 15  # [WORDS, 8]
    if GATHER:
        # tl.gather from the 16 loaded values (Triton stages them in shared memory): the [WORDS, 8] tile keeps
        # the store's layout, where a global-memory gather would get a layout of its own and a conversion.
        table = tl.load(code_ptr + tl.arange(0, 16))
        vals = tl.reshape(tl.gather(table, tl.reshape(codes, (WORDS * 8,)), 0), (WORDS, 8))
    else:
        vals = tl.load(code_ptr + codes)
    v = mul_rn(vals, tl.broadcast_to(am[:, None], (WORDS, 8)))
    if STRIDED:
        o = orow * ld + cw[:, None] * 8 + j[None, :]  # [WORDS, 8]: one contiguous run within the row
        mask = live[:, None] & (j[None, :] < 8)
    else:
        o = w[:, None] * 8 + j[None, :]  # [WORDS, 8] output indices, row-major: one contiguous run
        mask = o < n
    tl.store(out_ptr + o, round_to(v, out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _device_bounds(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Kept on the device: a host-to-device copy per call would serialize with the kernel.
    return bounds_4bit(quant_type, device)


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize CUDA ``x`` blockwise to 4 bits: (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    nbytes, nblocks = (n + 1) // 2, -(-n // blocksize)
    mid, order = _device_bounds(quant_type, x.device)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = max(1, QUANT_ELEMS // blocksize)
    grid = (-(-nblocks // rows),)
    _quantize_4bit_kernel[grid](
        flat,
        mid,
        order,
        packed,
        absmax,
        n,
        nbytes,
        nblocks,
        BS=blocksize,
        R=rows,
        FP4=quant_type == "fp4",
        HAS_TAIL=n % blocksize != 0,
        num_warps=QUANT_WARPS,
    )
    return packed, absmax


def dequantize_4bit(
    raw: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype,
    words_per_program: int = DEQUANT_WORDS,
    num_warps: int = DEQUANT_WARPS,
    gather: bool = DEQUANT_GATHER,
    out: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dequantize flat packed CUDA bytes with ``state`` to ``state.shape`` in one pass (double quant too); into
    ``out`` when given (``state.shape``, rows may be strided: a 2-D weight written into columns of a wider buffer).
    ``rows=(lo, hi)``: only those rows of a 2-D weight ([hi - lo, columns])."""
    n = state.shape.numel()
    if rows is not None:
        lo, hi = rows
        if len(state.shape) != 2 or not 0 <= lo <= hi <= state.shape[0] or state.shape[1] % 8:
            raise ValueError(f"dequantize_4bit: rows {rows} of a {tuple(state.shape)} weight (2-D, columns a "
                             "multiple of 8)")  # fmt: skip
        if out is None:
            out = torch.empty((hi - lo, state.shape[1]), dtype=out_dtype, device=raw.device)
        if hi == lo:
            return out
    dev = raw.device
    raw = raw.contiguous()
    if raw.numel() % 4 or raw.data_ptr() % 4:
        # Only n % 8 != 0 (or a misaligned view) gets here: an aligned, zero-padded copy of the bytes.
        padded = torch.zeros(-(-raw.numel() // 4) * 4, dtype=torch.uint8, device=dev)
        padded[: raw.numel()] = raw
        raw = padded
    words = raw.view(torch.int32)
    strided = rows is not None or (out is not None and not out.is_contiguous())
    if out is None:
        out = torch.empty(state.shape, dtype=out_dtype, device=dev)
    elif strided and (out.dim() != 2 or out.stride(1) != 1 or out.shape[1] % 8):
        raise ValueError(f"dequantize_4bit: out must be contiguous or 2-D rows of a multiple of 8 elements, got "
                         f"shape {tuple(out.shape)} strides {out.stride()}")  # fmt: skip
    row_words, ld = (out.shape[1] // 8, out.stride(0)) if strided else (1, 1)
    row0 = rows[0] if rows is not None else 0
    code = state.code.to(dev, torch.float32)
    if state.nested:
        extra = (state.nested_absmax.to(dev), state.nested_code.to(dev, torch.float32), state.offset.to(dev))
        nested_bs = state.nested_blocksize
    else:
        extra = (code, code, code)  # unused pointers
        nested_bs = 1
    if strided:  # a row per program, in runs of at most words_per_program words
        words_per_program = min(words_per_program, triton.next_power_of_2(row_words))
        grid = (out.shape[0], -(-row_words // words_per_program))
    else:
        grid = (-(-words.numel() // words_per_program),)
    _dequantize_4bit_kernel[grid](
        words,
        state.absmax.to(dev),
        code,
        *extra,
        out,
        n,
        words.numel(),
        row_words,
        ld,
        row0,
        BS=state.blocksize,
        WORDS=words_per_program,
        NESTED=state.nested,
        NESTED_BS=nested_bs,
        GATHER=gather,
        STRIDED=strided,
        num_warps=num_warps,
    )
    return out
