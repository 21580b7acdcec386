"""Loading Hugging Face causal LMs into kbit's quantized layers."""

from .default import default_model_path

__all__ = ["default_model_path"]
