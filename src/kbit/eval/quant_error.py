"""Size in memory and reconstruction error of every linear layer of a model, per quantization format."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..quant import dequantize_4bit, dequantize_int8_rowwise, quantize_4bit, quantize_int8_rowwise


@dataclass
class FormatReport:
    """Totals over the quantized layers for one format."""

    name: str
    weight_bytes: int  # packed weights + every statistic needed to dequantize them
    rel_rms_error: float  # ||W_q - W|| / ||W|| over all quantized weights together
    worst_layer: str
    worst_error: float
    seconds: float


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def quantize_weight(w: torch.Tensor, fmt: str, blocksize: int = 64) -> tuple[torch.Tensor, int]:
    """(dequantized weight, bytes it occupies quantized) for fmt in nf4, nf4-dq, fp4, fp4-dq, int8."""
    if fmt == "int8":
        cb, scb = quantize_int8_rowwise(w)
        return dequantize_int8_rowwise(cb, scb), _tensor_bytes(cb, scb)
    quant_type, _, dq = fmt.partition("-")
    packed, st = quantize_4bit(w, quant_type, blocksize, compress_statistics=bool(dq))
    size = _tensor_bytes(packed, st.absmax, st.nested_absmax, st.offset) + 16 * 4  # + the 16-entry table
    return dequantize_4bit(packed, st, torch.float32), size


def linear_weights(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.Tensor]:
    """The weights of every nn.Linear whose name does not end with one of ``skip``."""
    return {
        name: mod.weight.detach()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(name.endswith(s) for s in skip)
    }


def report(weights: dict[str, torch.Tensor], fmt: str, blocksize: int = 64) -> FormatReport:
    """Quantize every weight with ``fmt`` and total the bytes and the reconstruction error."""
    t0 = time.perf_counter()
    total_bytes, err2, ref2 = 0, 0.0, 0.0
    worst, worst_err = "", 0.0
    for name, w in weights.items():
        wf = w.float()
        deq, size = quantize_weight(wf, fmt, blocksize)
        e2, r2 = (deq - wf).pow(2).sum().item(), wf.pow(2).sum().item()
        total_bytes, err2, ref2 = total_bytes + size, err2 + e2, ref2 + r2
        if (e2 / r2) ** 0.5 > worst_err:
            worst, worst_err = name, (e2 / r2) ** 0.5
    return FormatReport(fmt, total_bytes, (err2 / ref2) ** 0.5, worst, worst_err, time.perf_counter() - t0)
