"""Writing what training produced in formats other tools read: PEFT adapters, merged or 4-bit HF folders."""

from .adapter import adapter_config, adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .checkpoint import write_hf_folder
from .gguf import export_gguf
from .merge import MergeReport, merge, merged_tensors, quantize_model

__all__ = [
    "MergeReport",
    "adapter_config",
    "adapter_state_dict",
    "export_gguf",
    "load_adapter",
    "merge",
    "merged_tensors",
    "quantize_model",
    "read_adapter_config",
    "save_adapter",
    "write_hf_folder",
]
