"""kbit's numeric core: bitsandbytes-exact 4-bit (NF4/FP4, double quant) and 8-bit formats. Pure tensors, no models."""

from .blockwise4 import (
    BLOCKSIZES_4BIT,
    as_bytes,
    compress_absmax,
    dequantize_4bit,
    dequantize_absmax,
    quantize_4bit,
    view_storage,
)
from .blockwise8 import BLOCKSIZES_8BIT, dequantize_blockwise, quantize_blockwise
from .codebooks import QUANT_TYPES_4BIT, code_4bit, dynamic_map
from .int8 import dequantize_int8_rowwise, quantize_int8_rowwise
from .state import QuantState

__all__ = [
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
    "QUANT_TYPES_4BIT",
    "QuantState",
    "as_bytes",
    "code_4bit",
    "compress_absmax",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_blockwise",
    "dequantize_int8_rowwise",
    "dynamic_map",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_int8_rowwise",
    "view_storage",
]
