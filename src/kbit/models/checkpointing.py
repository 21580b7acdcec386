"""Activation checkpointing modes for a transformers model's decoder layers: "full", "selective" or "none".

"full" recomputes each decoder layer's whole forward in the backward (the least memory: one hidden state per
layer). "selective" keeps the outputs of the expensive ops, the long matmuls (projections, attention scores)
and the fused attention kernels, and recomputes only the cheap ones in the backward: norms, RoPE, SwiGLU,
residual adds, NF4 dequantization and LoRA's rank-r up-projection (whose output is as large as the base
projection's but costs only 2·r FLOPs per element to rebuild). The step then costs about the FLOPs of no
checkpointing at a fraction of its activation memory. "none" keeps everything autograd saves.

Both checkpointing modes are transformers' own per-layer checkpointing (non-reentrant); "selective" passes
``torch.utils.checkpoint``'s selective-checkpoint context (torch >= 2.4), whose policy sees ATen ops: a Triton
kernel inside a layer is not an ATen op and is always recomputed, which is what the cheap kernels should be.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("full", "selective", "none")
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


def set_checkpointing(model: nn.Module, mode: str) -> str:
    """Checkpoint ``model``'s decoder layers as ``mode`` says ("full", "selective", "none"); returns a line."""
    if mode not in MODES:
        raise ValueError(f"checkpointing mode must be one of {', '.join(MODES)}, got {mode!r}")
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if mode == "none":
        disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
        disable()
        return "activation checkpointing: none"
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        import torch.utils.checkpoint as ckpt

        if not hasattr(ckpt, "create_selective_checkpoint_contexts"):
            raise RuntimeError(f"checkpointing mode 'selective' needs torch >= 2.4 (found {torch.__version__})")
        kwargs["context_fn"] = _selective_context
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(hf, "gradient_checkpointing_enable"):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"checkpointing: {type(hf).__name__} has no activation_checkpointing_enable(); use 'none'")
    return f"activation checkpointing: {mode} (every decoder layer)"
