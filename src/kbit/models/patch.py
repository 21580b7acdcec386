"""The fast path: swap a transformers causal LM's RMSNorm, SwiGLU, rotary embedding and loss for kbit's fused ops.

kbit keeps transformers' model classes (users' models, checkpoints and chat templates) and changes behaviour
per *instance*, never per class or module: norms and MLPs get a ``forward`` of their own, each attention
layer gets a copy of its class's ``forward`` whose ``apply_rotary_pos_emb`` is the fused one, and the causal
LM's ``forward`` computes the loss with the chunked LM-head cross-entropy when labels are given (the logits
are then never materialised and come back as ``None``). An unpatched model in the same process is untouched.

Only what is known to compute the same function is swapped; anything else keeps transformers' code and the
summary line says so (Gemma2's MLP is gelu-tanh, not SwiGLU; a LoRA-wrapped or quantized LM head keeps the
materialised-logits loss). LoRA and the quantized linears need nothing here: the patched MLP and attention call
their projections as modules, whatever wraps them. On CUDA the ops run as Triton kernels, elsewhere as their
PyTorch references (:mod:`kbit.kernels`).
"""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import apply_rotary, linear_cross_entropy, rms_norm, swiglu

log = logging.getLogger("kbit")
PATCHED_ATTR = "_kbit_fast_path"  # the summary line, set on the model once patched


@dataclass(frozen=True)
class Family:
    """What a model family's modules are called and how its RMSNorm rounds."""

    prefix: str  # class-name prefix: LlamaRMSNorm, LlamaMLP, LlamaAttention
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    round_normed: bool = True  # Llama: weight * normed.to(input_dtype); Gemma: (normed * (1 + w)).to(dtype)
    fused_gate_up: bool = False  # Phi3: one gate_up_proj, split in halves


FAMILIES = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family("Gemma2", norm_offset=1.0, round_normed=False),
    "phi3": Family("Phi3", fused_gate_up=True),
}
SWIGLU_ACTS = ("silu", "swish")


def apply_fast_path(model: nn.Module) -> str:
    """Patch a supported causal LM in place for the fused kernels; returns (and logs) one line saying what."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # a PeftModel
    if getattr(hf, PATCHED_ATTR, None):
        return getattr(hf, PATCHED_ATTR)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        line = (
            f"fast path: model type {model_type!r} is not supported ({', '.join(FAMILIES)}); using the reference path"
        )
        log.info(line)
        return line
    done, kept = [], []
    n = _patch_norms(hf, family)
    done.append(f"RMSNorm x{n}")
    act = getattr(hf.config, "hidden_act", None)
    if act in SWIGLU_ACTS:
        done.append(f"SwiGLU x{_patch_mlps(hf, family)}")
    else:
        kept.append(f"MLP ({getattr(hf.config, 'hidden_activation', act)} is not SwiGLU)")
    n = _patch_attention(hf, family)
    if n:
        done.append(f"RoPE x{n}")
    else:
        kept.append("RoPE (the attention does not call apply_rotary_pos_emb)")
    if _patch_loss(hf):
        done.append("chunked LM-head cross-entropy")
    else:
        kept.append("loss (the forward's signature is not the one this patch knows)")
    line = f"fast path for {model_type}: fused {', '.join(done)}"
    if kept:
        line += f"; kept transformers' {', '.join(kept)}"
    setattr(hf, PATCHED_ATTR, line)
    log.info(line)
    return line


def uses_fused_loss(model: nn.Module) -> bool:
    """True when ``model``'s forward computes the loss from hidden states in chunks (labels given, no logits)."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(hf.forward, "__func__", None) is _fused_loss_forward


# ---- RMSNorm ----


def _norm_forward(self: nn.Module, x: torch.Tensor, offset: float, round_normed: bool) -> torch.Tensor:
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    # Llama's `weight * normed.to(input_dtype)` promotes; Gemma's `.type_as(x)` keeps x's dtype.
    out_dtype = torch.promote_types(self.weight.dtype, x.dtype) if round_normed else x.dtype
    return rms_norm(x, self.weight, eps, offset, round_normed, out_dtype)


def _patch_norms(model: nn.Module, family: Family) -> int:
    name, count = f"{family.prefix}RMSNorm", 0
    for module in model.modules():
        if type(module).__name__ == name:
            fwd = functools.partial(_norm_forward, offset=family.norm_offset, round_normed=family.round_normed)
            module.forward = types.MethodType(fwd, module)
            count += 1
    return count


# ---- MLP ----


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _fused_gate_up_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # strided halves: the kernel reads them in place
    return self.down_proj(swiglu(gate, up))


def _patch_mlps(model: nn.Module, family: Family) -> int:
    name, count = f"{family.prefix}MLP", 0
    fwd = _fused_gate_up_mlp_forward if family.fused_gate_up else _mlp_forward
    for module in model.modules():
        if type(module).__name__ == name:
            module.forward = types.MethodType(fwd, module)
            count += 1
    return count


# ---- rotary embedding ----


def _fused_rope(original):
    """A drop-in ``apply_rotary_pos_emb`` that runs the fused op where it applies and ``original`` elsewhere."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Partial rotary (Phi3 variants), another head layout or trainable tables: transformers' own code.
        if unsqueeze_dim != 1 or cos.shape[-1] != q.shape[-1] or cos.requires_grad or cos.dim() != 3:
            return original(q, k, cos, sin, unsqueeze_dim)
        return apply_rotary(q, k, cos, sin)

    return apply_rotary_pos_emb


@functools.cache
def _with_fused_rope(forward: types.FunctionType) -> types.FunctionType:
    """A copy of an attention class's ``forward`` whose global ``apply_rotary_pos_emb`` is the fused one."""
    glb = dict(forward.__globals__)
    glb["apply_rotary_pos_emb"] = _fused_rope(forward.__globals__["apply_rotary_pos_emb"])
    fn = types.FunctionType(forward.__code__, glb, forward.__name__, forward.__defaults__, forward.__closure__)
    fn.__kwdefaults__ = forward.__kwdefaults__
    return fn


def _patch_attention(model: nn.Module, family: Family) -> int:
    name, count = f"{family.prefix}Attention", 0
    for module in model.modules():
        if type(module).__name__ != name:
            continue
        forward = type(module).forward
        if not isinstance(forward, types.FunctionType) or "apply_rotary_pos_emb" not in forward.__code__.co_names:
            return 0
        module.forward = types.MethodType(_with_fused_rope(forward), module)
        count += 1
    return count


# ---- loss ----

_FORWARD_ARGS = (
    "self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels",
    "use_cache", "logits_to_keep", "kwargs",
)  # fmt: skip


def _fused_loss_forward(self: nn.Module, *args, **kwargs):
    """transformers' causal-LM forward, with the loss from hidden states in chunks when labels are given."""
    reference = type(self).forward.__get__(self)
    names = _FORWARD_ARGS[1:-1]
    bound = dict(zip(names, args, strict=False)) | kwargs
    labels, shift_labels = bound.get("labels"), bound.get("shift_labels")
    head = self.get_output_embeddings()
    plain_head = type(head) is nn.Linear and head.bias is None  # not LoRA-wrapped, not quantized
    keep = bound.get("logits_to_keep", 0)
    if labels is None or not plain_head or not (isinstance(keep, int) and keep == 0):
        return reference(*args, **kwargs)
    return_dict = bound.pop("return_dict", None)
    num_items = bound.pop("num_items_in_batch", None)
    ignore_index = bound.pop("ignore_index", -100)
    for key in ("labels", "shift_labels", "logits_to_keep"):
        bound.pop(key, None)
    outputs = getattr(self, self.base_model_prefix)(**bound)
    hidden = outputs.last_hidden_state  # [B, T, H]
    if shift_labels is None:  # position t predicts token t+1, as transformers' ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = linear_cross_entropy(
        hidden,
        head.weight,
        shift_labels.to(hidden.device),
        "sum" if num_items is not None else "mean",
        ignore_index=ignore_index,
        softcap=getattr(self.config, "final_logit_softcapping", None),
    )
    if num_items is not None:  # transformers' token-normalised accumulation: sum / tokens of the whole step
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    return out.to_tuple() if return_dict is False else out


def _patch_loss(model: nn.Module) -> bool:
    import inspect

    try:
        params = tuple(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return False
    if params != _FORWARD_ARGS or not hasattr(model, "get_output_embeddings"):
        return False
    model.forward = types.MethodType(_fused_loss_forward, model)
    return True
