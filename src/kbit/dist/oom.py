"""Out of memory in a training step: say which rank, on what batch, what kbit expected, and what to try.

Under torchrun an out-of-memory error is one traceback among N, from whichever rank ran out first, in terms of
the allocator ("Tried to allocate 2.00 GiB"). :func:`explain_out_of_memory` wraps the step and re-raises it as a
:class:`RankOutOfMemoryError` whose one-line message names the rank and its device, the step and its micro-batch
shapes, kbit's estimate for that rank (:func:`kbit.estimate.estimate` for this strategy and world size) against
the device's memory, and the changes that lower the peak. The CPU allocator's failure (a plain RuntimeError) is
treated the same, so gloo runs report it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .setup import DistContext
from .shard import device_memory

_CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


class RankOutOfMemoryError(torch.OutOfMemoryError):
    """A rank ran out of memory in a training step; the message names the rank, the batch and kbit's estimate."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory error (CUDA) and the CPU allocator's failure to allocate."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and _CPU_ALLOCATOR_FAILURE in str(error)
    )


@contextlib.contextmanager
def explain_out_of_memory(
    ctx: DistContext,
    model: nn.Module,
    batches: Sequence[Any],
    *,
    step: int,
    strategy: str,
    optim: str = "adamw",
    gradient_checkpointing: bool = True,
    cpu_offload: bool = False,
) -> Iterator[None]:
    """Re-raise an out-of-memory error inside as RankOutOfMemoryError with :func:`oom_message`'s line."""
    try:
        yield
    except RankOutOfMemoryError:
        raise
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        shapes = [tuple(b.input_ids.shape) for b in batches]
        message = oom_message(ctx, model, shapes, step, strategy, optim, gradient_checkpointing, cpu_offload, error)
        raise RankOutOfMemoryError(message) from error


def oom_message(
    ctx: DistContext,
    model: nn.Module,
    shapes: Sequence[tuple[int, int]],
    step: int,
    strategy: str,
    optim: str,
    gradient_checkpointing: bool,
    cpu_offload: bool,
    error: BaseException | None = None,
) -> str:
    """One line: rank, device, step, micro-batch shapes, kbit's estimate for this rank, and what to try."""
    batch = max(b for b, _ in shapes)
    seq_len = max(t for _, t in shapes)
    where = f"rank {ctx.rank} of {ctx.world_size} ({ctx.device})" if ctx.distributed else f"the run on {ctx.device}"
    n = len(shapes)
    line = (
        f"{where} ran out of memory in step {step}: micro-batch of {batch} x {seq_len} tokens"
        f"{f' (one of {n} accumulated per step)' if n > 1 else ''}, strategy {strategy}"
    )
    est = rank_estimate(model, ctx.world_size, batch, seq_len, strategy, optim, gradient_checkpointing, cpu_offload)
    capacity = device_memory(ctx) / 2**30
    if est is not None:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.parts())
        line += f"; kbit estimates {est.total / 2**30:.2f} GiB for this rank ({parts}) of its {capacity:.1f} GiB"
    else:
        line += f"; kbit has no estimate for {type(model).__name__} (no transformers config), {capacity:.1f} GiB"
    first = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
    if first.startswith("CUDA out of memory."):  # torch's own numbers: what the failing allocation wanted
        line += f"; torch: {first.removeprefix('CUDA out of memory.').split('. GPU')[0].strip()}"
    tips = remedies(strategy, gradient_checkpointing, cpu_offload, batch, ctx.device.type == "cuda")
    return f"{line}; try {', '.join(tips)}"


def remedies(
    strategy: str, gradient_checkpointing: bool, cpu_offload: bool, batch: int, cuda: bool = True
) -> list[str]:
    """What lowers a rank's peak, cheapest change first (``cuda``: FSDP's CPU offload is an option)."""
    tips = []
    if not gradient_checkpointing:
        tips.append("activation checkpointing (memory_plan: full, or memory to keep layer inputs in host memory)")
    else:
        tips.append("memory_plan: memory (layer inputs in host memory), or full if a speed plan kept some layers")
    if batch > 1:
        tips.append("a smaller per_device_train_batch_size (with more gradient_accumulation_steps)")
    tips.append("a shorter max_seq_len")
    if strategy != "fsdp":
        tips.append("strategy fsdp (shards the weights over the GPUs)")
    elif not cpu_offload and cuda:
        tips.append("cpu_offload: true (shards and optimizer state in host memory)")
    tips.append("more GPUs (kbit estimate --gpus N --strategy fsdp shows the split per GPU)")
    return tips


def rank_estimate(
    model: nn.Module,
    world_size: int,
    batch: int,
    seq_len: int,
    strategy: str,
    optim: str,
    gradient_checkpointing: bool,
    cpu_offload: bool,
):
    """kbit's estimate (:class:`kbit.estimate.Estimate`) of one rank's peak for this model, or None without one."""
    from ..estimate import estimate, model_shape
    from ..lora.inject import SETTINGS_ATTR

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return None
    loaded = getattr(model, "kbit_load_config", None)
    settings = getattr(model, SETTINGS_ATTR, None)
    kw = dict(
        lora_r=settings.r if settings is not None else 16,
        bits=loaded.bits if loaded is not None else 4,
        double_quant=loaded.double_quant if loaded is not None else True,
        optim=optim,
        gradient_checkpointing=gradient_checkpointing,
        world_size=world_size,
        strategy=strategy if strategy in ("ddp", "fsdp") else "none",
        cpu_offload=cpu_offload and strategy == "fsdp",
    )
    if kw["strategy"] == "fsdp" and optim != "adamw":
        kw["optim"] = "adamw"  # the only one kbit runs under FSDP; the trainer refused the others already
    try:
        return estimate(model_shape(config), seq_len, batch, **kw)
    except ValueError:  # a combination the estimator does not model: report without a number
        return None
