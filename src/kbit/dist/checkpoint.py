"""Sharded checkpoints of a distributed run: every rank writes and reads only its own shards.

``torch.distributed.checkpoint`` (DCP) saves the trainable parameters (LoRA shards under FSDP, DTensors) and the
optimizer state keyed by parameter name, so a resume puts each shard back where it came from, and a run may
even resume on another number of ranks (DCP reshards on load). Frozen 4-bit weights are never saved: they are
re-read from the base model. The adapter is restored *from these shards*, in place, into the parameters the
optimizer holds: the accelerate bug where resumed adapters silently restarted from their initial values came
from loading into copies. Each rank also keeps its own RNG state (dropout masks differ per rank).

The PEFT adapter beside the shards (and the final export) is gathered to full tensors on every rank (a
collective) and written by rank 0 alone, in the master dtype (fp32 LoRA stays fp32, not the bf16 compute copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .setup import DistContext
from .shard import full_tensor, is_sharded

SHARDED_DIR = "sharded"


def _rank_rng_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (DTensor shards under FSDP), as live tensors to save from or load into."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write trainable parameters + optimizer state to ``folder/sharded`` with DCP (collective: every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    path = Path(folder) / SHARDED_DIR
    state = {"model": trainable_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path))
    return path


def load_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``folder/sharded`` into this rank's parameters and optimizer, in place (collective: every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(folder) / SHARDED_DIR
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a sharded checkpoint (no .metadata); resume from a checkpoint of this run")
    state = {"model": trainable_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises a multi-line CheckpointException naming every rank's failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the checkpoint does not fit this model and optimizer ({first})") from None
    # Parameters were filled in place; the optimizer's state is set through its own API (keys are names).
    set_optimizer_state_dict(model, optimizer, state["optim"])


def save_rank_rng(folder: str | os.PathLike, ctx: DistContext, rng: dict[str, Any]) -> None:
    """Write this rank's RNG states beside the shards."""
    torch.save(rng, Path(folder) / _rank_rng_name(ctx.rank))


def load_rank_rng(folder: str | os.PathLike, ctx: DistContext) -> dict[str, Any] | None:
    """This rank's saved RNG states, or None when the checkpoint has none for it (another world size)."""
    path = Path(folder) / _rank_rng_name(ctx.rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters on every rank (all-gathers sharded ones: collective)."""
    return {name: full_tensor(p.detach()).to("cpu").clone() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter_gathered(
    model: nn.Module,
    directory: str | os.PathLike,
    ctx: DistContext,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the (possibly sharded) model's adapter as a PEFT folder from rank 0; every rank must call it."""
    from safetensors.torch import save_file

    from ..export.adapter import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        _write_atomically,
        adapter_config,
        adapter_state_dict,
        save_adapter,
    )

    if not ctx.distributed and not is_sharded(model):  # one process: the ordinary writer
        return save_adapter(model, directory, base_model_name_or_path, overwrite=True)
    directory = Path(directory)
    live = adapter_state_dict(model)
    tensors = {key: full_tensor(t.detach()).to("cpu").contiguous() for key, t in live.items()}  # collective
    if ctx.is_main:
        config = adapter_config(model, base_model_name_or_path)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        _write_atomically(directory / CONFIG_NAME, lambda p: p.write_text(text))
    ctx.barrier()  # nobody reads the folder before rank 0 has written it
    return directory
