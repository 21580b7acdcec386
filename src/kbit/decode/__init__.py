"""Fast generation: a static KV cache, CUDA-graph decode steps and the fused 4-bit GEMV."""

from .engine import FAMILIES, Decoder, decode, decoder_for, project, unsupported_reason
from .sampling import pick

__all__ = ["FAMILIES", "Decoder", "decode", "decoder_for", "pick", "project", "unsupported_reason"]
