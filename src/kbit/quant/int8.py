"""LLM.int8-style row-wise int8 weights (bitsandbytes ``Linear8bitLt`` format).

``SCB[r] = max |W16[r, :]|`` (float32, W16 = the weight cast to float16) and
``CB = round_half_even(W16 * (127 / SCB[r]))`` as int8; dequantization is ``CB * SCB[r] * (1/127)`` in float32.
A row of zeros stores SCB 0 and codes 0 (bitsandbytes would produce NaN codes there).
"""

from __future__ import annotations

import torch

from . import validate

INV_127 = 7.874015718698502e-3  # bitsandbytes' literal for 1/127


def quantize_int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight row-wise to int8; returns (CB int8 [out, in], SCB float32 [out])."""
    validate.check_float_input(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"row-wise int8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    w16 = w.to(torch.float16)
    if not bool(torch.isfinite(w16).all()):
        raise ValueError("weight overflows float16 (|w| > 65504); int8 weights are computed from float16")
    scb = w16.abs().amax(dim=1).float()
    scale = 127.0 / scb
    cb = torch.round(w16 * scale[:, None])  # float16 * float32 -> float32, as in bitsandbytes
    cb = torch.where((scb == 0)[:, None], torch.zeros_like(cb), cb)
    return cb.to(torch.int8), scb


def dequantize_int8_rowwise(
    cb: torch.Tensor, scb: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``CB * SCB * (1/127)`` row-wise in float32, cast to ``out_dtype``."""
    if cb.dtype != torch.int8:
        raise ValueError(f"int8 weight codes must be int8, got {cb.dtype}")
    validate.check_out_dtype(out_dtype)
    return (cb * scb.float().view(-1, 1) * INV_127).to(out_dtype)
