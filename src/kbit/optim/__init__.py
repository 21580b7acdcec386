"""Optimizers for (Q)LoRA training: 8-bit blockwise AdamW and paged (pinned host memory) AdamW, by name."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .adamw8bit import AdamW8bit
from .paged import PagedAdamW, PagedAdamW8bit

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


def _torch_adamw(params: list, **kwargs) -> torch.optim.Optimizer:
    # torch's fused kernel when every parameter is on a device it supports; its default otherwise.
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``params`` (tensors or param groups)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return _torch_adamw(params, **kwargs)
    cls = {"adamw_8bit": AdamW8bit, "paged_adamw": PagedAdamW, "paged_adamw_8bit": PagedAdamW8bit}[name]
    return cls(params, **kwargs)


__all__ = ["OPTIMIZERS", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "build_optimizer"]
