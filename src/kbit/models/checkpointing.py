"""Activation checkpointing per decoder layer of a transformers model: "none", "full", "offload" or "selective".

"none" keeps everything autograd saves (the fastest, the most memory). "full" recomputes the layer's whole forward
in the backward and keeps only its input (one hidden state per layer). "offload" is "full" whose kept input waits
in pinned host memory, copied out and back on a side stream overlapped with compute (:mod:`kbit.models.offload`).
"selective" keeps the outputs of the expensive ops, the long matmuls (projections, attention scores) and the fused
attention kernels, and recomputes only the cheap ones in the backward: norms, RoPE, SwiGLU, residual adds, NF4
dequantization and LoRA's rank-r up-projection (whose output is as large as the base projection's but costs only
2·r FLOPs per element to rebuild).

Each mode is transformers' own per-layer hook: every decoder layer (a ``GradientCheckpointingLayer``) runs its
forward through ``layer._gradient_checkpointing_func`` when ``layer.gradient_checkpointing`` is set, and both are
set here per layer instance, so one model can mix modes (:mod:`kbit.models.memory_plan` chooses the mix). All are
non-reentrant; "selective" passes ``torch.utils.checkpoint``'s selective-checkpoint context (torch >= 2.4), whose
policy sees ATen ops: a Triton kernel inside a layer is not an ATen op and is always recomputed, which is what the
cheap kernels should be.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from .offload import Offloader

MODES = ("full", "selective", "offload", "none")
RECOMPUTE_MAX_K = 64  # matmuls contracting over at most this many elements are recomputed (LoRA's B @ (A x))

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default: 0, _aten.addmm.default: 1, _aten.bmm.default: 0}  # op -> index of the [.., K] input
_ATTENTION = {
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
}


def selective_policy(ctx, op, *args, **kwargs):
    """Save attention and long-contraction matmul outputs; recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMULS and args[_MATMULS[op]].shape[-1] > RECOMPUTE_MAX_K:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_policy)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s decoder layers, the modules transformers checkpoints one by one (GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpoint_function(mode: str, offloader: Offloader | None):
    from torch.utils.checkpoint import checkpoint

    if mode == "offload":
        return offloader.checkpoint
    if mode == "selective":
        import torch.utils.checkpoint as ckpt

        if not hasattr(ckpt, "create_selective_checkpoint_contexts"):
            raise RuntimeError(f"checkpointing mode 'selective' needs torch >= 2.4 (found {torch.__version__})")
        return partial(checkpoint, use_reentrant=False, context_fn=_selective_context)
    return partial(checkpoint, use_reentrant=False)


def set_checkpointing(model: nn.Module, plan: str | Sequence[str]) -> str:
    """Checkpoint ``model``'s decoder layers as ``plan`` says (one mode for all, or one per layer); returns a line."""
    for mode in [plan] if isinstance(plan, str) else plan:
        if mode not in MODES:
            raise ValueError(f"checkpointing mode must be one of {', '.join(MODES)}, got {mode!r}")
    layers = decoder_layers(model)
    if not layers:
        if plan == "none" or (not isinstance(plan, str) and not plan):
            return "activation checkpointing: none"
        raise ValueError(
            f"checkpointing: {type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer) "
            "to checkpoint; use 'none'"
        )
    modes = [plan] * len(layers) if isinstance(plan, str) else list(plan)
    if len(modes) != len(layers):
        raise ValueError(f"checkpointing: the plan has {len(modes)} modes for {len(layers)} decoder layers")
    offloader = Offloader() if "offload" in modes else None  # one per model: its streams and prefetch chain
    # "none" layers get full checkpointing's function too, unused while their flag is off (as transformers does)
    functions = {mode: _checkpoint_function(mode, offloader) for mode in (set(modes) | {"full"}) - {"none"}}
    for layer, mode in zip(layers, modes, strict=True):
        layer.gradient_checkpointing = mode != "none"
        layer._gradient_checkpointing_func = functions[mode if mode != "none" else "full"]
    # Other modules with the flag (the decoder stack) follow the layers: transformers' is_gradient_checkpointing
    # and code that reads the stack's flag see whether anything recomputes.
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    anything, layer_ids = any(mode != "none" for mode in modes), {id(layer) for layer in layers}
    for module in hf.modules():
        if hasattr(module, "gradient_checkpointing") and id(module) not in layer_ids:
            module.gradient_checkpointing = anything
    return describe(modes)


def describe(modes: Sequence[str]) -> str:
    """One line naming each mode's layers: 'activation checkpointing: full (every decoder layer)' or ranges."""
    if len(set(modes)) == 1:
        return f"activation checkpointing: {modes[0]} (every decoder layer)"
    runs: list[list] = []  # [mode, first, last]
    for i, mode in enumerate(modes):
        if runs and runs[-1][0] == mode:
            runs[-1][2] = i
        else:
            runs.append([mode, i, i])
    parts = [f"layer{'s' if b > a else ''} {a}{f'-{b}' if b > a else ''} {mode}" for mode, a, b in runs]
    return f"activation checkpointing per layer: {', '.join(parts)}"
