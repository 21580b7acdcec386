"""Blockwise dynamic 8-bit quantization (8-bit optimizer states, double quantization of 4-bit scales).

Semantics, identical on every device and byte-for-byte equal to bitsandbytes' CPU backend:
``absmax[b] = max |x|`` over block b; ``s = clamp(x * (1 / absmax), -1, 1)`` in float32;
``bin = trunc(float32((s + 1) * 0.5 * 65535 + 0.5))`` (the multiply-add fused, one rounding); ``q = lut[bin]`` where
``lut`` maps each of the 65,536 bins to its nearest code (see :func:`kbit.quant.codebooks.lut_8bit`). An all-zero
block stores absmax 0 and code 0. Dequantization is ``code[q] * absmax[b]`` in float32, rounded to the output dtype.
bitsandbytes' CUDA kernels pick codes by binary search instead, which differs for a small fraction of values near
code midpoints (by one code step).
"""

from __future__ import annotations

import torch

from . import validate
from .codebooks import dynamic_map, lut_8bit

BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each ``blocksize`` block of ``x`` flattened (last block over its real elements), float32."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))  # zeros never raise a max of |x|
    return flat.view(nb, blocksize).abs().amax(dim=1)


def lut_bins(scaled: torch.Tensor) -> torch.Tensor:
    """Bin index in [0, 65535] of values already scaled to [-1, 1] (float32), as bitsandbytes' CPU code computes it."""
    s = scaled.clamp(-1.0, 1.0)
    h = (s + 1.0) * 0.5  # exact: s + 1 rounds once, * 0.5 is exact
    # fma(h, 65535, 0.5) with a single float32 rounding: the float64 product is exact (24 + 16 bits) and the sum
    # is exact or rounds far below float32 precision, so rounding the float64 result once gives the fma result.
    return (h.double() * 65535.0 + 0.5).float().to(torch.int32)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to uint8 codes of ``code`` (default: signed dynamic map) per block; returns (q, absmax fp32)."""
    validate.check_float_input(x, "x")
    if blocksize not in BLOCKSIZES_8BIT:
        raise ValueError(f"blocksize {blocksize} is not supported for 8-bit; use one of {list(BLOCKSIZES_8BIT)}")
    code = dynamic_map(True, x.device) if code is None else code
    from ..kernels import dispatch

    return dispatch.quantize_blockwise(x, code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 4096,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in float32, cast to ``out_dtype``."""
    if q.dtype != torch.uint8:
        raise ValueError(f"8-bit codes must be uint8, got {q.dtype}")
    validate.check_out_dtype(out_dtype)
    code = dynamic_map(True, q.device) if code is None else code
    from ..kernels import dispatch

    return dispatch.dequantize_blockwise(q, absmax, code, blocksize, out_dtype)


# ---- PyTorch reference implementations (CPU, tests; the Triton kernels must match them bit for bit) ----


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 8-bit blockwise quantizer (see module docstring)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    nb = absmax.numel()
    pad = nb * blocksize - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    zero = absmax == 0
    inv = torch.where(zero, 0.0, 1.0 / absmax)  # IEEE division; all-zero blocks are set to code 0 below
    scaled = flat.view(nb, blocksize) * inv[:, None]
    q = lut_8bit(code, x.device)[lut_bins(scaled)]
    q = torch.where(zero[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise_ref(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Reference 8-bit blockwise dequantizer."""
    flat = q.reshape(-1)
    n, nb = flat.numel(), absmax.numel()
    vals = code.float().index_select(0, flat.to(torch.int32))
    if n < nb * blocksize:
        vals = torch.nn.functional.pad(vals, (0, nb * blocksize - n))
    out = vals.view(nb, blocksize) * absmax.float()[:, None]
    return out.reshape(-1)[:n].to(out_dtype).reshape(q.shape)
