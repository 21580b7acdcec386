"""Loading Hugging Face causal LMs into kbit's quantized layers."""

from .default import default_model_path
from .load import LoadConfig, load_model, load_tokenizer, resolve_source

__all__ = ["LoadConfig", "default_model_path", "load_model", "load_tokenizer", "resolve_source"]
