"""Several GPUs: FSDP2 sharding of 4-bit models or DDP over LoRA, launched with torchrun (docs/distributed.md).

``init_distributed()`` opens the process group from torchrun's environment and picks each rank's device;
``apply_strategy(model, ctx, "auto"|"fsdp"|"ddp"|"none")`` shards or wraps the model; ``load_sharded`` loads a
model straight into FSDP shards, layer by layer, with its LoRA; the trainer does this when ``kbit train`` runs
under ``torchrun``, saves sharded checkpoints through :mod:`kbit.dist.checkpoint`, and names the rank, batch and
memory estimate when a step runs out of memory (:mod:`kbit.dist.oom`).
"""

from .loading import LayerPlacer, LoadMemory, load_sharded
from .oom import RankOutOfMemoryError, explain_out_of_memory
from .setup import DistContext, close_distributed, current_context, init_distributed, launched_by_torchrun
from .shard import (
    STRATEGIES,
    Sharder,
    StrategyError,
    apply_strategy,
    compute_device,
    decoder_layers,
    full_tensor,
    is_sharded,
    local_tensor,
    match_quant_storage,
    resolve_strategy,
    shard_model,
    sync_gradients,
    unit_dtype,
    wrap_ddp,
)

__all__ = [
    "STRATEGIES",
    "DistContext",
    "LayerPlacer",
    "LoadMemory",
    "RankOutOfMemoryError",
    "Sharder",
    "StrategyError",
    "apply_strategy",
    "close_distributed",
    "compute_device",
    "current_context",
    "decoder_layers",
    "explain_out_of_memory",
    "full_tensor",
    "init_distributed",
    "is_sharded",
    "launched_by_torchrun",
    "load_sharded",
    "local_tensor",
    "match_quant_storage",
    "resolve_strategy",
    "shard_model",
    "sync_gradients",
    "unit_dtype",
    "wrap_ddp",
]
