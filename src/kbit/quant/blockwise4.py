"""Blockwise 4-bit quantization (NF4 / FP4), bit-exact with bitsandbytes 0.50.

Format: the input is flattened row-major (blocks cross rows); per block of ``blocksize`` elements
``absmax = max |x|`` (float32); each element is scaled, ``s = clamp(x * (1 / absmax), -1, 1)`` (for a partial last
block bitsandbytes divides instead: ``s = x / absmax``), and gets the code of its nearest table value (ties to the
lower one). Two codes per byte, element 2k in the high nibble; an odd count is padded with the code of 0.0. The bytes
are then only *viewed* as ``quant_storage`` (never converted), shaped (bytes / itemsize, 1).
With double quantization the block scales are stored as 8-bit codes of ``absmax - mean(absmax)``
(:mod:`kbit.quant.blockwise8`, blocksize 256, signed dynamic map).

Dequantization is ``table[code] * absmax`` in float32, rounded to the output dtype.
"""

from __future__ import annotations

import torch

from . import validate
from .blockwise8 import dequantize_blockwise, quantize_blockwise
from .codebooks import bounds_4bit, check_quant_type, code_4bit, dynamic_map
from .state import QuantState

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize: int) -> None:
    """Raise a ValueError unless ``blocksize`` is a supported 4-bit blocksize."""
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize {blocksize!r} is not supported; use one of {list(BLOCKSIZES_4BIT)}")


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``x`` blockwise to 4 bits; returns (packed bytes viewed as ``quant_storage``, state)."""
    validate.check_float_input(x, "x")
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    validate.check_storage(quant_storage)
    from ..kernels import dispatch

    packed, absmax = dispatch.quantize_4bit(x, quant_type, blocksize)
    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code_4bit(quant_type, x.device),
    )
    if compress_statistics:
        state = compress_absmax(state)
    return view_storage(packed, quant_storage), state


def compress_absmax(state: QuantState) -> QuantState:
    """Double quantization: 8-bit codes of ``absmax - mean(absmax)`` in blocks of 256 (signed dynamic map)."""
    absmax = state.absmax
    # The mean is taken on the CPU with torch's own float32 reduction so that the offset (and so every nested
    # code) is identical to bitsandbytes' on any device; a GPU reduction sums in another order.
    offset = absmax.cpu().mean().to(absmax.device)
    code8 = dynamic_map(True, absmax.device)
    q, nested_absmax = quantize_blockwise(absmax - offset, code8, NESTED_BLOCKSIZE)
    state.absmax, state.offset = q, offset
    state.nested_absmax, state.nested_code = nested_absmax, code8
    state.nested_blocksize, state.nested_dtype = NESTED_BLOCKSIZE, torch.float32
    return state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 block scales of ``state`` (reconstructed from their 8-bit codes under double quant)."""
    if not state.nested:
        return state.absmax.float()
    return dequantize_blockwise(state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize) + (
        state.offset
    )


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dequantize ``packed`` (any storage dtype) to ``state.shape`` in ``out_dtype`` (default ``state.dtype``), or
    into ``out`` (that shape; its rows may be strided: the first columns of a wider buffer). ``rows=(lo, hi)``:
    only rows lo..hi of a 2-D weight (what a memory plan dequantizes at a time)."""
    shape = state.shape
    if rows is not None:
        if len(shape) != 2 or not 0 <= rows[0] <= rows[1] <= shape[0]:
            raise ValueError(f"dequantize_4bit: rows {rows} are not rows of a {tuple(shape)} weight")
        shape = torch.Size((rows[1] - rows[0], shape[1]))
    if out is not None:
        if out.shape != shape:
            raise ValueError(f"dequantize_4bit: out is {tuple(out.shape)} but the weight is {tuple(shape)}")
        out_dtype = out.dtype
    out_dtype = state.dtype if out_dtype is None else out_dtype
    validate.check_out_dtype(out_dtype)
    check_quant_type(state.quant_type)
    check_blocksize(state.blocksize)
    raw = as_bytes(packed)
    need = (state.shape.numel() + 1) // 2
    if not need <= raw.numel() < need + packed.element_size():  # storage views may pad to a whole element
        raise ValueError(f"packed tensor has {raw.numel()} bytes but shape {tuple(state.shape)} needs {need}")
    raw = raw[:need]
    from ..kernels import dispatch

    return dispatch.dequantize_4bit(raw, state, out_dtype, out, rows)


def view_storage(packed_u8: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """View packed uint8 bytes as ``quant_storage``, shape (bytes / itemsize, 1). Bytes are never converted."""
    validate.check_storage(quant_storage)
    flat = packed_u8.reshape(-1)
    item = torch.empty((), dtype=quant_storage).element_size()
    if flat.numel() % item:
        # bitsandbytes cannot store this either; pad rather than fail so any shape quantizes
        flat = torch.nn.functional.pad(flat, (0, item - flat.numel() % item))
    return flat.view(quant_storage).unsqueeze(1)


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes of a 4-bit tensor stored in any ``quant_storage`` dtype, flat uint8 (a view, no copy)."""
    validate.check_storage(packed.dtype)
    return packed.contiguous().view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)


# ---- PyTorch reference implementations (CPU, tests; the Triton kernels must match them bit for bit) ----


_CHUNK = 1 << 20  # elements per step of the reference quantizer: bounds its float32 temporaries to a few MB


def quantize_4bit_ref(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 4-bit quantizer: (packed uint8 [(n+1)//2], absmax fp32 [blocks])."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    mid, order = bounds_4bit(quant_type, x.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    for start in range(0, full, _CHUNK):  # whole blocks, multiplied by the reciprocal of their absmax
        blocks = flat[start : min(start + _CHUNK, full)].float().view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        scaled = (blocks * (1.0 / am.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0).view(-1)
        packed[start // 2 : start // 2 + scaled.numel() // 2] = _pack(scaled, mid, order)
    if full < n:  # a partial last block is divided by its absmax, as bitsandbytes does; a zero tail stores 1e-38
        tail = flat[full:].float()
        am = tail.abs().amax().clamp(min=1e-38)
        absmax[-1] = am
        scaled = (tail / am).clamp_(-1.0, 1.0)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed[full // 2 :] = _pack(scaled, mid, order)
    return packed, absmax


def _pack(scaled: torch.Tensor, mid: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Nearest codes of an even number of scaled values, two per byte (first in the high nibble)."""
    q = order[torch.bucketize(scaled, mid, out_int32=True)]
    return (q[0::2] << 4) | q[1::2]


def dequantize_4bit_ref(
    raw: torch.Tensor, absmax: torch.Tensor, state: QuantState, out_dtype: torch.dtype
) -> torch.Tensor:
    """Reference 4-bit dequantizer from flat bytes and float32 block scales."""
    n, bs = state.shape.numel(), state.blocksize
    table = state.code.to(raw.device, torch.float32)
    # One gather through a 256-entry byte -> (high, low) table. Each pair of float32 values travels as one int64
    # (a 1-D gather of 8-byte words is several times faster on CPU than gathering 2-float rows).
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1).contiguous().view(torch.int64)
    vals = pairs.view(-1).index_select(0, raw.to(torch.int32)).view(torch.float32)
    nb = absmax.numel()
    if vals.numel() < nb * bs:
        vals = torch.nn.functional.pad(vals, (0, nb * bs - vals.numel()))
    out = vals[: nb * bs].view(nb, bs) * absmax.float()[:, None]
    return out.reshape(-1)[:n].to(out_dtype).reshape(state.shape)
