"""kbit: QLoRA fine-tuning with bitsandbytes-exact 4-bit / 8-bit quantization.

The public API; everything else may change.
"""

from .export import load_adapter, merge, quantize_model, save_adapter
from .generate import generate, generate_batch
from .lora import active_adapter, add_lora, list_adapters, print_trainable_parameters, set_adapter
from .models import load_model, load_tokenizer
from .quant import QuantState, dequantize_4bit, quantize_4bit
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = [
    "QuantState",
    "active_adapter",
    "add_lora",
    "dequantize_4bit",
    "generate",
    "generate_batch",
    "list_adapters",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "merge",
    "print_trainable_parameters",
    "quantize_4bit",
    "quantize_model",
    "save_adapter",
    "set_adapter",
    "TrainConfig",
    "Trainer",
]
