"""Several GPUs: FSDP2 sharding of 4-bit models or DDP over LoRA, launched with torchrun (docs/distributed.md).

``init_distributed()`` opens the process group from torchrun's environment and picks each rank's device;
``apply_strategy(model, ctx, "auto"|"fsdp"|"ddp"|"none")`` shards or wraps the model; the trainer does both when
``kbit train`` runs under ``torchrun``, and saves sharded checkpoints through :mod:`kbit.dist.checkpoint`.
"""

from .setup import DistContext, close_distributed, current_context, init_distributed, launched_by_torchrun
from .shard import (
    STRATEGIES,
    StrategyError,
    apply_strategy,
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
    "StrategyError",
    "apply_strategy",
    "close_distributed",
    "current_context",
    "decoder_layers",
    "full_tensor",
    "init_distributed",
    "is_sharded",
    "launched_by_torchrun",
    "local_tensor",
    "match_quant_storage",
    "resolve_strategy",
    "shard_model",
    "sync_gradients",
    "unit_dtype",
    "wrap_ddp",
]
