"""kbit: QLoRA fine-tuning with bitsandbytes-exact 4-bit / 8-bit quantization."""

from .quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["QuantState", "dequantize_4bit", "quantize_4bit"]
