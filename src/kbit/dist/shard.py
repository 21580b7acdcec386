"""Spread a (4-bit) model over the ranks: FSDP2 per decoder layer, or DDP over the LoRA parameters only.

FSDP2 (``fully_shard``) shards every *parameter* of a unit on dim 0 and all-gathers the unit before its forward
and backward. kbit's ``Linear4bit`` keeps its packed weight as a frozen parameter of shape (bytes / itemsize, 1),
so it shards like any other parameter; with ``quant_storage`` equal to the compute dtype (bf16 on GPUs) every unit
holds one dtype and FSDP gathers plain bf16 tensors whose bytes are never converted. The rules, and why:

- **One dtype per unit.** FSDP mixed precision casts floating parameters to ``param_dtype`` before gathering; a
  packed weight stored as fp16/uint8 under a bf16 policy would be cast as if its bytes were numbers (the silent
  ``loss=0.0`` / ``grad_norm=nan`` of accelerate#3983), and torch < 2.6 copies a mixed-dtype unit through one
  buffer of the first parameter's dtype. So the packed weights' ``quant_storage`` must equal ``param_dtype``, the
  dtype of the model's frozen floating parameters; the LoRA parameters (fp32 masters) are cast to it for compute
  and their gradients reduced in fp32. :func:`shard_model` refuses anything else with one line naming the layer.
- **Quantization statistics are replicated, not sharded.** ``absmax`` and the double-quant tables are buffers;
  FSDP leaves buffers whole on every rank and never casts them. Sharding them as parameters would put fp32
  ``nested_absmax`` under the bf16 cast (corrupting it) and uint8 ``absmax`` into a second dtype. The cost is
  small: with double quant the statistics are 1/32 of the packed bytes (1 byte per 64 weights, ~1.1 GB for 70B).
- **Units:** each decoder layer (transformers' ``_no_split_modules`` classes), then the root for the embeddings,
  final norm and head; tied embedding/head weights stay in the root unit together. :class:`Sharder` holds the
  options of every unit of a model, so that :func:`shard_model` (a loaded model) and
  :func:`kbit.dist.load_sharded` (each layer as it loads) shard alike.

DDP is for models that fit one device: each rank keeps the whole (quantized) model and only the trainable
parameters are broadcast at start and all-reduced after backward; frozen weights and statistics are told to DDP
as ignored, so no integer or packed tensor ever enters a collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models.load import decoder_layer_paths
from ..nn import Linear4bit
from .setup import DistContext

STRATEGIES = ("auto", "fsdp", "ddp", "none")
SHARDING_ATTR = "kbit_sharding"  # set on a model sharded by kbit: how (see Sharding)

try:  # torch >= 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )
try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]


class StrategyError(ValueError):
    """A strategy that cannot apply to this model, launch or device; the message says what to do."""


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule) has been sharded with FSDP2."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def compute_device(model: nn.Module) -> torch.device:
    """The device ``model`` computes on: its parameters' device, or for a model kbit sharded the ranks' device
    (with cpu_offload its parameter shards live in host memory and only gather onto the GPU to compute)."""
    sharding = getattr(model, SHARDING_ATTR, None)
    return sharding.device if sharding is not None else next(model.parameters()).device


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor is all-gathered (a collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the model's repeated blocks: transformers' ``_no_split_modules`` classes."""
    return [(path, model.get_submodule(path)) for path in decoder_layer_paths(model)]


def unit_dtype(model: nn.Module) -> torch.dtype:
    """The one dtype every FSDP unit gathers in: that of the model's frozen floating parameters.

    Packed 4-bit weights are storage, not numbers, and are left out of the vote; trainable parameters (LoRA
    masters) are cast to it by the mixed-precision policy.
    """
    packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}
    found: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if id(p) not in packed and not p.requires_grad and p.is_floating_point():
            found.setdefault(p.dtype, name)
    if len(found) > 1:
        listed = ", ".join(f"{n} is {str(d).removeprefix('torch.')}" for d, n in found.items())
        raise StrategyError(
            f"strategy fsdp needs the frozen weights in one dtype ({listed}); load the model with one compute_dtype"
        )
    if not found:
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return next(iter(found))


def match_quant_storage(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-view every Linear4bit's packed bytes as ``dtype`` (the same bytes, no conversion); returns how many."""
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.quant_storage != dtype:
            module.set_quant_storage(dtype)
            changed += 1
    return changed


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_fsdp_dtypes(model: nn.Module, dtype: torch.dtype, prefix: str = "") -> None:
    """StrategyError naming the first parameter FSDP would gather in a dtype other than ``dtype``.

    ``prefix``: the path of ``model`` inside the whole model (a decoder layer), for the message.
    """
    at = f"{prefix}." if prefix else ""
    name_of = {id(m.weight): p for p, m in model.named_modules() if isinstance(m, Linear4bit)}
    for name, p in model.named_parameters():
        if id(p) in name_of:
            storage = p.dtype
            if storage != dtype:
                raise StrategyError(
                    f"{at}{name_of[id(p)]}: quant_storage {_name(storage)} differs from the compute dtype "
                    f"{_name(dtype)} that FSDP gathers in; load the model with quant_storage={dtype} (kbit train "
                    f"and kbit.dist.load_sharded do) or call kbit.dist.match_quant_storage(model, {dtype})"
                )
        elif not p.is_floating_point():
            raise StrategyError(
                f"{at}{name} is {_name(p.dtype)}: FSDP units must hold one floating dtype (8-bit models keep "
                "int8 weights, and so cannot be sharded or offloaded); use strategy ddp without cpu_offload, "
                "or bits 4"
            )
        elif not p.requires_grad and p.dtype != dtype:
            raise StrategyError(
                f"{at}{name} is {_name(p.dtype)} but this model's FSDP units gather in {_name(dtype)} (its compute "
                "dtype); load the model with one compute_dtype"
            )


@dataclass(frozen=True)
class Sharding:
    """How kbit sharded a model (kept on it as ``kbit_sharding``): gather dtype, shards on the host or not."""

    dtype: torch.dtype
    cpu_offload: bool
    world_size: int
    device: torch.device  # where the model computes (with cpu_offload its shards are in host memory)


class Sharder:
    """FSDP2's options for every unit of one model: a mesh over the ranks, mixed precision, CPU offload.

    Parameters are gathered in ``dtype`` (the model's compute dtype, which the packed 4-bit weights are stored
    as), gradients reduced in fp32; trainable shards stay in their own dtype (fp32 LoRA masters).
    """

    def __init__(
        self, ctx: DistContext, dtype: torch.dtype, cpu_offload: bool = False, reshard_after_forward: bool = True
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise StrategyError(
                "strategy fsdp needs a process group: launch with torchrun --nproc-per-node N (or use strategy none)"
            )
        if cpu_offload and ctx.device.type != "cuda":
            raise StrategyError(
                "cpu_offload: FSDP offloads shards from GPU memory to host memory, and this run is on the CPU "
                "already; drop cpu_offload (or run on CUDA GPUs)"
            )
        from torch.distributed.device_mesh import init_device_mesh

        self.ctx, self.dtype, self.cpu_offload = ctx, dtype, cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.options = dict(
            mesh=init_device_mesh(ctx.device.type, (ctx.world_size,)),
            mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
            offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
        )

    def shard(self, module: nn.Module, path: str) -> None:
        """Make ``module`` one FSDP unit: a decoder layer at ``path``, or the root (path ``""``) after all layers."""
        check_fsdp_dtypes(module, self.dtype, path)
        if path:
            fully_shard(module, reshard_after_forward=self.reshard_after_forward, **self.options)
        else:  # the root keeps FSDP's own choice: its parameters are needed again at once by the backward
            fully_shard(module, **self.options)
            sharding = Sharding(self.dtype, self.cpu_offload, self.ctx.world_size, self.ctx.device)
            setattr(module, SHARDING_ATTR, sharding)


def shard_model(
    model: nn.Module,
    ctx: DistContext,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to each decoder layer, then to the root, in place; returns ``model`` (now an FSDPModule).

    Needs an open process group (torchrun). Mixed precision: parameters gathered in the model's compute dtype,
    gradients reduced in fp32; the sharded trainable parameters stay in their own dtype (fp32 masters).
    """
    if is_sharded(model):
        raise StrategyError(f"{type(model).__name__} is already sharded with FSDP; shard a model once")
    dtype = unit_dtype(model)
    check_fsdp_dtypes(model, dtype)  # before any collective: every rank refuses alike
    layers = decoder_layers(model)
    if not layers:
        raise StrategyError(f"{type(model).__name__} has no repeated decoder layers to shard; use strategy ddp")
    sharder = Sharder(ctx, dtype, cpu_offload, reshard_after_forward)
    if cpu_offload:
        check_offload_fits(model_bytes(model) // ctx.world_size, local_ranks(ctx))
    for path, layer in layers:
        sharder.shard(layer, path)
    sharder.shard(model, "")
    return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over ``model``'s trainable parameters only; returns the wrapper to call forward through."""
    if not (dist.is_available() and dist.is_initialized()):
        raise StrategyError(
            "strategy ddp needs a process group: launch with torchrun --nproc-per-node N (or use strategy none)"
        )
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)  # every buffer is ignored above, so none is broadcast


def resolve_strategy(strategy: str, ctx: DistContext, model: nn.Module | int, cpu_offload: bool = False) -> str:
    """The strategy to apply: ``auto`` picks none (one process), else ddp when the model takes under a third of
    this rank's device memory (host memory shared by the local ranks on CPU), else fsdp.

    ``model``: the model, or the bytes it will take once loaded (to choose before loading it). A model that
    kbit sharded as it loaded (:func:`kbit.dist.load_sharded`) resolves to fsdp with its own cpu_offload.
    """
    if strategy not in STRATEGIES:
        raise StrategyError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(model, nn.Module) and is_sharded(model):
        return _already_sharded(model, strategy, cpu_offload)
    group = dist.is_available() and dist.is_initialized()
    if strategy == "auto":
        size = model if isinstance(model, int) else model_bytes(model)
        if cpu_offload:
            strategy = "fsdp"
        elif ctx.world_size == 1:
            strategy = "none"
        else:
            strategy = "ddp" if size < device_memory(ctx) / 3 else "fsdp"
    if strategy == "none" and ctx.world_size > 1:
        raise StrategyError(
            f"strategy none under a launch of {ctx.world_size} processes would train {ctx.world_size} separate "
            "models; use strategy auto, fsdp or ddp"
        )
    if strategy in ("fsdp", "ddp") and not group:
        raise StrategyError(
            f"strategy {strategy} needs a process group: launch with torchrun --nproc-per-node N (or use strategy none)"
        )
    if cpu_offload and strategy != "fsdp":
        raise StrategyError(
            f"cpu_offload offloads FSDP shards, but strategy {strategy} keeps whole weights on the device; "
            "use strategy fsdp"
        )
    return strategy


def _already_sharded(model: nn.Module, strategy: str, cpu_offload: bool) -> str:
    """fsdp for a model sharded before the trainer saw it, if the asked strategy and offload agree with it."""
    if strategy not in ("auto", "fsdp"):
        raise StrategyError(
            f"strategy {strategy}: {type(model).__name__} is already sharded with FSDP (kbit.dist.load_sharded "
            "shards as it loads); use strategy fsdp, or load the model with kbit.load_model"
        )
    sharding = getattr(model, SHARDING_ATTR, None)
    if sharding is not None and sharding.cpu_offload != cpu_offload:
        raise StrategyError(
            f"cpu_offload: {str(cpu_offload).lower()} asked for, but the model was sharded with cpu_offload "
            f"{str(sharding.cpu_offload).lower()} as it loaded; load it again with the same cpu_offload"
        )
    return "fsdp"


def apply_strategy(
    model: nn.Module, ctx: DistContext, strategy: str, cpu_offload: bool = False
) -> tuple[nn.Module, str]:
    """(module to call forward through, resolved strategy): the model sharded / wrapped in place as asked."""
    strategy = resolve_strategy(strategy, ctx, model, cpu_offload)
    if strategy == "fsdp":
        return (model if is_sharded(model) else shard_model(model, ctx, cpu_offload=cpu_offload)), strategy
    if strategy == "ddp":
        return wrap_ddp(model, ctx), strategy
    return model, strategy


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are held (packed 4-bit weights at their size)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def local_ranks(ctx: DistContext) -> int:
    """How many ranks of this launch share this host (torchrun's LOCAL_WORLD_SIZE)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)), 1)


def device_memory(ctx: DistContext) -> int:
    """Total memory of this rank's device; on CPU the host's memory divided among the local ranks."""
    if ctx.device.type == "cuda":
        return torch.cuda.get_device_properties(ctx.device).total_memory
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size // local_ranks(ctx)


def host_available_bytes() -> int | None:
    """The host memory the kernel says is available now (MemAvailable), or None where it cannot tell."""
    try:
        for line in open("/proc/meminfo").read().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_offload_fits(bytes_per_rank: int, ranks_here: int, available: int | None = None) -> None:
    """StrategyError when the shards cpu_offload pins in host memory cannot fit the host's available memory.

    Pinned pages cannot be swapped: a host that runs out while pinning kills the run without a Python error.
    """
    available = host_available_bytes() if available is None else available
    need = bytes_per_rank * ranks_here
    if available is not None and need > 0.9 * available:  # the rest of each process needs host memory too
        raise StrategyError(
            f"cpu_offload: the {ranks_here} rank(s) on this host would pin {need / 2**30:.1f} GiB of shards in host "
            f"memory ({bytes_per_rank / 2**30:.1f} GiB each), but only {available / 2**30:.1f} GiB is available; "
            "spread the run over more hosts, free host memory, or drop cpu_offload"
        )


@contextlib.contextmanager
def sync_gradients(forward_model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) of this backward unless ``sync``.

    Gradient accumulation syncs only on the window's last micro-batch; the accumulated gradient is the same.
    """
    if sync:
        yield
        return
    if hasattr(forward_model, "no_sync"):  # DDP
        with forward_model.no_sync():
            yield
        return
    if isinstance(forward_model, FSDPModule):
        forward_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            forward_model.set_requires_gradient_sync(True)
        return
    yield
