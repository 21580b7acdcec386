"""Writing what training produced in formats other tools read: PEFT adapters, merged or 4-bit HF folders."""

from .adapter import adapter_config, adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .checkpoint import write_hf_folder
from .merge import MergeReport, merge, merged_tensors, quantize_model, save_base


def export_gguf(model_dir, out_file, out_type: str = "f16", overwrite: bool = False):
    """Write a 16-bit Hugging Face folder as a GGUF file (imports the optional ``gguf`` package on first use)."""
    from .gguf import export_gguf as export

    return export(model_dir, out_file, out_type=out_type, overwrite=overwrite)


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
    "save_base",
    "write_hf_folder",
]
