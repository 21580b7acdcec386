"""Codebooks (quantization maps) shared by every kbit format.

All tables are built on the CPU in float32 with the same torch expressions bitsandbytes uses, so their bits match
bitsandbytes' tables exactly; devices receive copies. Thresholds for "nearest code" are the float32 midpoints of
adjacent sorted codes, and a value equal to a midpoint goes to the lower code (``torch.bucketize`` semantics).
"""

from __future__ import annotations

from functools import cache

import torch

QUANT_TYPES_4BIT = ("nf4", "fp4")

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al. 2023); index = code, ascending.
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# FP4 e2m1 as bitsandbytes defines it: bit 3 is the sign, the low 3 bits index these magnitudes (then / 12).
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


@cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    data = torch.tensor(_FP4, dtype=torch.float32)
    return data.div_(data.abs().max())  # division (not reciprocal) as bitsandbytes does


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type; ``table[code]`` is the normalised value."""
    check_quant_type(quant_type)
    return _code_4bit_cpu(quant_type).to(device, copy=True)


@cache
def _bounds_4bit_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_4bit_cpu(quant_type)
    order = torch.argsort(code, stable=True)  # FP4 is not sorted; NF4's order is the identity
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order.to(torch.uint8)


def bounds_4bit(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(15 fp32 midpoints of the sorted table, 16 sorted-position -> code map) for nearest-code search."""
    check_quant_type(quant_type)
    mid, order = _bounds_4bit_cpu(quant_type)
    return mid.to(device), order.to(device)


@cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for each exponent i the
    # fraction means of linspace(0.1, 1, k) scaled by 10^(i-6), both signs when signed, plus 0 and 1.0.
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))  # the unsigned map has 256 entries already; kept for symmetry
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry dynamic 8-bit map (signed: first moments, double quant; unsigned: second moments)."""
    return _dynamic_map_cpu(bool(signed)).to(device, copy=True)


LUT_SIZE = 65536


@cache
def _lut_8bit_cpu(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    # bitsandbytes' CPU 8-bit quantizer: [-1, 1] is cut into 65,536 bins, each bin's centre value taken to the
    # code whose midpoint interval holds it. Rebuilt here with the same float32 arithmetic.
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / (LUT_SIZE - 1)
    mid = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mid, val, right=False).to(torch.uint8)


def lut_8bit(code: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65,536-entry bin -> code table that defines kbit's (and bitsandbytes' CPU) 8-bit quantizer."""
    code = code.detach().to("cpu", torch.float32).contiguous()
    if code.numel() != 256:
        raise ValueError(f"an 8-bit code must have 256 entries, got {code.numel()}")
    return _lut_8bit_cpu(code.numpy().tobytes()).to(device)


def check_quant_type(quant_type: str) -> None:
    """Raise a ValueError naming the allowed 4-bit types unless ``quant_type`` is one."""
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type {quant_type!r} is not supported; use one of {list(QUANT_TYPES_4BIT)}")
