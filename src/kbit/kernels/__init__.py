"""Kernels behind the quantization API: a PyTorch reference for every op, Triton kernels for CUDA tensors."""
