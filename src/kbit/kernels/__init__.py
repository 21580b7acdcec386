"""Kernels behind the quantization API and the fused training ops: a PyTorch reference for every op, Triton
kernels for CUDA tensors."""

from .activation import swiglu
from .loss import linear_cross_entropy
from .norm import rms_norm
from .rotary import apply_rotary

__all__ = ["apply_rotary", "linear_cross_entropy", "rms_norm", "swiglu"]
