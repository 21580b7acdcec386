"""Triton kernels for CUDA; each matches its PyTorch reference in :mod:`kbit.quant` bit for bit."""
