"""Load a 4-bit model straight into FSDP2 shards: no rank ever holds the whole model, not even in 4 bits.

``kbit.load_model`` streams the checkpoint one tensor at a time, but on its own it leaves each rank with the whole
quantized model on its GPU (35 GiB for a 70B model) before sharding. Here its ``on_layer`` hook takes each decoder
layer the moment its weights are loaded, puts LoRA on it (a frozen FSDP unit cannot gain parameters later), re-views
its packed weights as the compute dtype, and makes it an FSDP unit: FSDP keeps this rank's 1/N of it and frees the
rest. The embeddings, final norm and head are loaded last and sharded as the root unit. So a rank's device holds at
most its shards, the replicated quantization statistics and one whole layer (at the end the root unit, which a
training step gathers whole anyway); with ``cpu_offload`` the shards go to pinned host memory as they are made.

LoRA's A matrices draw from the global RNG in model order, exactly as ``add_lora`` on the loaded model would: seed
before calling and the adapter starts from the same values as in a one-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..lora.inject import SETTINGS_ATTR, LoraSettings, find_targets
from ..lora.layer import LoRALinear
from ..models.load import load_model
from .hostmem import peak_rss_gib, reset_peak_rss
from .setup import DistContext
from .shard import (
    Sharder,
    StrategyError,
    check_offload_fits,
    local_ranks,
    local_tensor,
    match_quant_storage,
    resolve_strategy,
)


@dataclass
class LoadMemory:
    """What loading cost one rank: bytes of model tensors on its device, and its host memory."""

    peak_model_bytes: int = 0  # most bytes of model tensors on the device at once (shards + one whole unit)
    final_model_bytes: int = 0  # after the load: this rank's shards + the replicated statistics
    layer_bytes: list[int] = field(default_factory=list)  # each decoder layer's bytes on this rank once sharded
    peak_device_bytes: int | None = None  # torch.cuda.max_memory_allocated over the load (CUDA only)
    peak_host_gib: float = 0.0  # peak resident host memory over the load (VmHWM)


def resident_bytes(module: nn.Module, device: torch.device) -> int:
    """Bytes of ``module``'s parameters and buffers held on ``device`` (this rank's shard of a sharded one)."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        local = local_tensor(t)
        if id(t) in seen or local.device.type != device.type or local.is_meta:
            continue
        seen.add(id(t))
        total += local.numel() * local.element_size()
    return total


class LayerPlacer:
    """``load_model``'s ``on_layer`` hook: LoRA on each decoder layer, then FSDP2 on it; the root unit last."""

    def __init__(
        self,
        ctx: DistContext,
        dtype: torch.dtype,
        lora: LoraSettings | None = None,
        lora_dtype: torch.dtype = torch.float32,
        cpu_offload: bool = False,
    ) -> None:
        if lora is not None and lora.modules_to_save:
            raise StrategyError(
                "modules_to_save: a sharded load puts LoRA on each layer as it loads and cannot copy whole modules; "
                "load with kbit.load_model and shard afterwards (strategy fsdp does), or drop modules_to_save"
            )
        self.ctx, self.dtype, self.lora, self.lora_dtype = ctx, dtype, lora, lora_dtype
        self.sharder = Sharder(ctx, dtype, cpu_offload)
        self.memory = LoadMemory()
        self._targets: list[str] | None = None  # LoRA targets, found on the first call (paths never change)

    def __call__(self, model: nn.Module, path: str) -> None:
        """Shard the decoder layer at ``path`` of ``model`` (its weights all loaded), or the root (path "")."""
        module = model.get_submodule(path) if path else model
        match_quant_storage(module, self.dtype)  # a pre-quantized checkpoint keeps its storage: the same bytes
        if self.lora is not None:
            self._add_lora(model, path)
        # the moment this unit is whole on the device next to everything sharded so far: the load's peak
        held = resident_bytes(model, self.ctx.device)
        self.memory.peak_model_bytes = max(self.memory.peak_model_bytes, held)
        self.sharder.shard(module, path)
        if path:
            self.memory.layer_bytes.append(resident_bytes(module, self.ctx.device))
        else:
            if self.lora is not None:
                setattr(model, SETTINGS_ATTR, self.lora)
            self.memory.final_model_bytes = resident_bytes(model, self.ctx.device)

    def _add_lora(self, model: nn.Module, path: str) -> None:
        # add_lora's wrapping, one unit at a time: the targets are found once on the whole (partly loaded) model
        if self._targets is None:
            self._targets = find_targets(model, self.lora)
            if not self._targets:
                what = f"target_modules={self.lora.target_modules!r}"
                raise ValueError(f"{what} selects no layer of {type(model).__name__}")
        mine = [t for t in self._targets if not path or t.startswith(path + ".")]
        s = self.lora
        for target in mine:
            base = model.get_submodule(target)
            if isinstance(base, LoRALinear):
                continue  # wrapped with its layer already (the root call sees every target)
            layer = LoRALinear(base, s.r, s.alpha, s.dropout, s.use_rslora, s.use_dora, s.init, self.lora_dtype)
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)


def expected_model_bytes(source: str | os.PathLike, bits: int = 4, double_quant: bool = True) -> int | None:
    """The loaded model's bytes (kbit.estimate's weights: exact for kbit's layers), from its config alone; None
    when the config cannot be read without loading the model."""
    from ..estimate import estimate, load_config, model_shape

    try:
        shape = model_shape(load_config(source))
    except (ValueError, OSError, KeyError):  # an architecture transformers cannot build on meta: decide later
        return None
    return int(estimate(shape, 1, 1, bits=bits, double_quant=double_quant).weights)


def loads_sharded(strategy: str, ctx: DistContext, expected_bytes: int | None, cpu_offload: bool = False) -> bool:
    """True when this launch should load straight into FSDP shards: the strategy is fsdp, or auto resolves to it
    for a model of ``expected_bytes`` (None: auto decides after loading, on the loaded model)."""
    if not (ctx.distributed or cpu_offload) or (strategy == "auto" and expected_bytes is None):
        return False
    return resolve_strategy(strategy, ctx, expected_bytes or 0, cpu_offload) == "fsdp"


def load_sharded(
    source: str | os.PathLike,
    ctx: DistContext,
    lora: LoraSettings | None = None,
    *,
    lora_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    blocksize: int = 64,
    expected_bytes: int | None = None,
) -> tuple[nn.Module, LoadMemory]:
    """(model sharded with FSDP2 as it loaded, with LoRA per ``lora``; what the load cost this rank).

    Every rank must call it (collective). The packed 4-bit weights are stored in ``compute_dtype``, the dtype FSDP
    gathers in. ``expected_bytes``: the loaded model's size (kbit.estimate), to refuse a ``cpu_offload`` that the
    host cannot hold before loading anything. The Trainer takes the result as it is (strategy fsdp or auto).
    """
    if bits == 8:
        raise StrategyError(
            "bits 8: FSDP cannot shard int8 weights (one floating dtype per unit); use bits 4, or strategy ddp "
            "with kbit.load_model"
        )
    if cpu_offload and expected_bytes is not None:
        check_offload_fits(expected_bytes // ctx.world_size, local_ranks(ctx))
    placer = LayerPlacer(ctx, compute_dtype, lora, lora_dtype, cpu_offload)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    reset_peak_rss()
    model = load_model(
        source,
        bits=bits,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        quant_storage=compute_dtype,
        skip_modules=skip_modules,
        device=ctx.device,
        blocksize=blocksize,
        on_layer=placer,
    )
    memory = placer.memory
    memory.peak_host_gib = peak_rss_gib()
    if cuda:
        memory.peak_device_bytes = torch.cuda.max_memory_allocated(ctx.device)
    return model, memory


def sharded_load_line(ctx: DistContext, memory: LoadMemory) -> str:
    """Every rank's load peaks on its device, in one line (collective: every rank must call it)."""
    mine = [memory.peak_model_bytes, memory.final_model_bytes, memory.peak_device_bytes or 0]
    values = ctx.all_reduce([v if r == ctx.rank else 0 for r in range(ctx.world_size) for v in mine]).tolist()
    ranks = []
    for r in range(ctx.world_size):
        peak, final, allocated = (v / 2**30 for v in values[3 * r : 3 * r + 3])
        line = f"rank {r} at most {peak:.2f} GiB of model tensors on its device ({final:.2f} once sharded)"
        ranks.append(line + (f", {allocated:.2f} GiB allocated at the peak" if allocated else ""))
    return "; ".join(ranks)
