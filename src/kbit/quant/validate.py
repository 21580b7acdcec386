"""Input checks shared by the quantizers: one clear ValueError naming the bad value and what is allowed."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_float_input(x: torch.Tensor, name: str = "input") -> None:
    """Floating input of a supported dtype with only finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; quantization supports {_names(FLOAT_DTYPES)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; nothing to quantize")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf values; quantization needs finite values")


def check_out_dtype(dtype: torch.dtype) -> None:
    """A dequantization output dtype kbit supports."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype {dtype} is not supported; use one of {_names(FLOAT_DTYPES)}")


def check_storage(dtype: torch.dtype) -> None:
    """A quant_storage dtype kbit supports."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage {dtype} is not supported; use one of {_names(STORAGE_DTYPES)}")
