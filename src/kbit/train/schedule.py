"""Learning-rate schedules with linear warmup, and the optimizer the trainer builds from a TrainConfig.

``lr_factor(step, ...)`` is the multiplier of the peak learning rate for optimizer step ``step`` (0-based):

    warmup (step < W):  (step + 1) / W
    then, with progress p = (step - W) / (total - W) in [0, 1):
        cosine:    0.5 * (1 + cos(pi * p))
        linear:    1 - p
        constant:  1

Unlike transformers' schedules (whose first step has learning rate 0 and whose last step reaches 0 exactly),
every step here moves the weights: the first warmup step uses 1/W of the peak and the last step a small
positive rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch

from .config import TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use cosine, linear or constant")


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """warmup_steps when set, else warmup_ratio of the run (rounded up, as transformers does)."""
    return config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_factor`; its state (the step count) goes into checkpoints."""
    factor = partial(
        lr_factor,
        total_steps=total_steps,
        warmup_steps=warmup_steps(config, total_steps),
        kind=config.lr_scheduler_type,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optim``: kbit.optim's when present, else torch's AdamW for 'adamw'."""
    betas = (config.adam_beta1, config.adam_beta2)
    try:
        from ..optim import build_optimizer as build_kbit_optimizer
    except ImportError:
        build_kbit_optimizer = None
    if build_kbit_optimizer is not None:
        return build_kbit_optimizer(
            config.optim,
            params,
            lr=config.learning_rate,
            betas=betas,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
    if config.optim != "adamw":
        raise ValueError(f"optim={config.optim!r} needs kbit.optim, which this install lacks; use optim=adamw")
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=betas,
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
