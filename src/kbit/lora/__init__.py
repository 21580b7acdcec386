"""LoRA / rsLoRA / DoRA adapters on any linear-like layer (plain or kbit-quantized), PEFT-compatible."""

from .adapters import active_adapter, adapter_active, adapter_tensors, list_adapters, set_adapter
from .fused import enable_fused_lora
from .grouped import group_lora
from .inject import (
    LoraSettings,
    add_lora,
    apply_lora,
    find_targets,
    lora_layers,
    lora_settings,
    print_trainable_parameters,
    saved_modules,
    target_names,
    trainable_parameters,
)
from .layer import LoRALinear, is_linear_like, is_quantized_linear

__all__ = [
    "LoRALinear",
    "LoraSettings",
    "active_adapter",
    "adapter_active",
    "adapter_tensors",
    "add_lora",
    "apply_lora",
    "enable_fused_lora",
    "find_targets",
    "group_lora",
    "is_linear_like",
    "is_quantized_linear",
    "list_adapters",
    "lora_layers",
    "lora_settings",
    "print_trainable_parameters",
    "saved_modules",
    "set_adapter",
    "target_names",
    "trainable_parameters",
]
