"""Loading Hugging Face causal LMs into kbit's quantized layers, and patching them for the fused kernels."""

from .checkpointing import set_checkpointing
from .default import default_model_path
from .load import LoadConfig, load_model, load_tokenizer, resolve_source
from .memory_plan import MemoryPlan, plan_memory
from .patch import apply_fast_path

__all__ = [
    "LoadConfig",
    "MemoryPlan",
    "apply_fast_path",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "plan_memory",
    "resolve_source",
    "set_checkpointing",
]
