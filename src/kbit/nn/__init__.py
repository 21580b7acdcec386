"""Frozen quantized linear layers with bitsandbytes-compatible state dicts (dequantize + matmul forward)."""

from .functional import DequantLinear, dequant_linear
from .linear4bit import Linear4bit, read_packed_4bit
from .linear8bit import Linear8bit

__all__ = ["DequantLinear", "Linear4bit", "Linear8bit", "dequant_linear", "read_packed_4bit"]
