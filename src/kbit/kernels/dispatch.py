"""Chooses the implementation of each quantization op from the tensor's device.

CUDA tensors use the Triton kernels when Triton imports; everything else (CPU, or ``KBIT_KERNELS=reference``) uses the
PyTorch reference in :mod:`kbit.quant`. Both produce identical bytes and values; tests hold them to that.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from ..quant import blockwise4, blockwise8
from ..quant.state import QuantState


@cache
def _triton_ok() -> bool:
    if os.environ.get("KBIT_KERNELS", "auto") == "reference":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and the Triton kernels are available."""
    return t.is_cuda and _triton_ok()


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32)."""
    if use_triton(x):
        from .triton import quant4

        return quant4.quantize_4bit(x, quant_type, blocksize)
    return blockwise4.quantize_4bit_ref(x, quant_type, blocksize)


def dequantize_4bit(
    raw: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dequantize flat packed bytes with ``state`` (double quant included); into ``out`` (rows may be strided);
    ``rows=(lo, hi)``: only those rows of a 2-D weight."""
    if use_triton(raw):
        from .triton import quant4

        return quant4.dequantize_4bit(raw, state, out_dtype, out=out, rows=rows)
    w = blockwise4.dequantize_4bit_ref(raw, blockwise4.dequantize_absmax(state), state, out_dtype)
    if rows is not None:
        w = w[rows[0] : rows[1]]
    return w if out is None else out.copy_(w)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` on ``ids``' device; a CUDA ``ids`` reads a page-locked host ``table`` in place (no copy to
    the host, no synchronisation), anything else looks up where the table is and moves the rows."""
    if use_triton(ids) and (table.is_cuda or table.is_pinned()):
        from .triton import gather

        return gather.gather_rows(table, ids)
    return table[ids.to(table.device)].to(ids.device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, absmax fp32)."""
    if use_triton(x):
        from .triton import quant8

        return quant8.quantize_blockwise(x, code, blocksize)
    return blockwise8.quantize_blockwise_ref(x, code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``code[q] * absmax[block]`` cast to ``out_dtype``."""
    if use_triton(q):
        from .triton import quant8

        return quant8.dequantize_blockwise(q, absmax, code, blocksize, out_dtype)
    return blockwise8.dequantize_blockwise_ref(q, absmax, code, blocksize, out_dtype)


def gemv_4bit(
    x: torch.Tensor,
    raw: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W)^T + bias + lora_scale * xa @ lora_b^T`` in ``x.dtype`` (decode-sized inputs), then
    ``+ residual`` [M, N] rounded as a separate addition. ``xa`` is ``x A^T`` or :func:`lora_down`'s form of it.

    The reference dequantizes W to ``x.dtype`` and multiplies; for one row on CUDA (up to four on Hopper, bfloat16)
    the Triton/Gluon kernel reads the packed weight once and folds the LoRA branch and the residual into its epilogue
    (fp32 sums, one rounding).
    """
    raw = raw.reshape(-1)
    if gemv_fuses(x, raw, state):
        from .triton import gemv4

        return gemv4.gemv_4bit(x, raw, state, bias, xa, lora_b, lora_scale, residual)
    y = torch.nn.functional.linear(x, dequantize_4bit(raw, state, x.dtype), bias)
    if xa is not None:
        if x.shape[0] == 1 and xa.shape[0] > 1:  # partial sums from lora_down
            xa = xa.float().sum(0, keepdim=True).to(x.dtype)
        y = (y.float() + lora_scale * (xa.float() @ lora_b.float().t())).to(x.dtype)
    return y if residual is None else y + residual


GEMV_MAX_ROWS = 4  # rows of x the fused GEMV takes in one pass (triton.gemv4_smem.MAX_ROWS, a test checks)


def gemv_fuses(x: torch.Tensor, raw: torch.Tensor, state: QuantState) -> bool:
    """True when :func:`gemv_4bit` runs the fused kernel for these rows of x: one row on CUDA, up to four on Hopper
    with bfloat16 (a decode batch), a weight with whole blocks per row."""
    if not use_triton(x) or x.shape[0] > GEMV_MAX_ROWS:
        return False
    from .triton import gemv4

    return gemv4.supports(state, x.shape[1], x.dtype) and gemv4.rows_supported(x, raw.reshape(-1), state)


def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x A^T`` for LoRA's down-projection, in the form :func:`gemv_4bit` takes as ``xa``: for one row on CUDA
    float32 partial sums [S, r] (one launch, summed in the GEMV's epilogue), else ``F.linear(x, a)``."""
    if use_triton(x) and x.shape[0] == 1:
        from .triton import gemv4

        return gemv4.lora_down(x, a)
    return torch.nn.functional.linear(x, a)
