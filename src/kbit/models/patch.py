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

import contextlib
import functools
import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import apply_rotary, linear_cross_entropy, rms_norm, swiglu
from ..lora.fused import enable_fused_lora
from ..lora.grouped import group_lora
from ..lora.layer import LoRALinear

log = logging.getLogger("kbit")
PATCHED_ATTR = "_kbit_fast_path"  # the summary line, set on the model once patched


@dataclass(frozen=True)
class Family:
    """What a model family's modules are called and how its RMSNorm rounds."""

    prefix: str  # class-name prefix: LlamaRMSNorm, LlamaMLP, LlamaAttention
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    round_normed: bool = True  # Llama: weight * normed.to(input_dtype); Gemma: (normed * (1 + w)).to(dtype)
    fused_gate_up: bool = False  # Phi3: one gate_up_proj, split in halves
    # (norm, projection) per decoder layer: the norm's output is the input of that projection's LoRA group
    feeds: tuple[tuple[str, str], ...] = (
        ("input_layernorm", "self_attn.q_proj"),
        ("post_attention_layernorm", "mlp.gate_proj"),
    )


FAMILIES = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family(
        "Gemma2",
        norm_offset=1.0,
        round_normed=False,
        feeds=(("input_layernorm", "self_attn.q_proj"), ("pre_feedforward_layernorm", "mlp.gate_proj")),
    ),
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
    adapters = sum(isinstance(m, LoRALinear) for m in hf.modules())
    fused = enable_fused_lora(hf)
    if fused:
        groups = group_lora(hf)
        _widen_group_inputs(hf, family)
        done.append(f"LoRA with its base projection x{fused}" + f" ({groups} q/k/v or gate/up groups)" * (groups > 0))
    line = f"fast path for {model_type}: fused {', '.join(done)}"
    if kept:
        line += f"; kept transformers' {', '.join(kept)}"
    if adapters > fused:  # they run as separate modules, as on the reference path (not transformers' own code)
        line += f"; {adapters - fused} LoRA layers unfused (dropout, DoRA, or adapters not in the compute dtype)"
    setattr(hf, PATCHED_ATTR, line)
    log.info(line)
    return line


def uses_fused_loss(model: nn.Module) -> bool:
    """True when ``model``'s forward computes the loss from hidden states in chunks (labels given, no logits)."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(hf.forward, "__func__", None) is _fused_loss_forward


LOSS_CHUNK_ATTR = "_kbit_loss_chunk_rows"  # on the patched causal LM: None for the loss's own 256 MiB rule


def set_loss_chunk_rows(model: nn.Module, rows: int | None) -> None:
    """Run ``model``'s fused loss in chunks of at most ``rows`` tokens (None: its default); no-op unpatched."""
    if rows is not None and rows < 1:
        raise ValueError(f"loss chunk rows must be >= 1 or None, got {rows}")
    if uses_fused_loss(model):
        hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        setattr(hf, LOSS_CHUNK_ATTR, rows)


# ---- RMSNorm ----


def _norm_forward(self: nn.Module, x: torch.Tensor, offset: float, round_normed: bool) -> torch.Tensor:
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    # Llama's `weight * normed.to(input_dtype)` promotes; Gemma's `.type_as(x)` keeps x's dtype.
    out_dtype = torch.promote_types(self.weight.dtype, x.dtype) if round_normed else x.dtype
    return rms_norm(x, self.weight, eps, offset, round_normed, out_dtype, getattr(self, SPARE_COLS_ATTR, 0))


SPARE_COLS_ATTR = "_kbit_spare_cols"  # on a patched norm whose output feeds a LoRA group: columns to leave spare


def _widen_group_inputs(model: nn.Module, family: Family) -> None:
    """Have each norm that feeds a LoRA group make its output with the group's spare columns (no copy of x)."""
    from .checkpointing import decoder_layers

    for layer in decoder_layers(model):
        for norm_name, proj_name in family.feeds:
            norm, proj = getattr(layer, norm_name, None), _get(layer, proj_name)
            group = getattr(proj, "group", None)
            if norm is not None and hasattr(norm, "weight"):
                setattr(norm, SPARE_COLS_ATTR, group.spare_cols() if group is not None else 0)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _patch_norms(model: nn.Module, family: Family) -> int:
    name, count = f"{family.prefix}RMSNorm", 0
    for module in model.modules():
        if type(module).__name__ == name:
            fwd = functools.partial(_norm_forward, offset=family.norm_offset, round_normed=family.round_normed)
            module.forward = types.MethodType(fwd, module)
            count += 1
    return count


# ---- MLP ----
#
# At long sequences the MLP's intermediates dominate a layer: gate, up and silu(gate)·up are [T, intermediate]
# each (11.5 GB apiece for the Llama-3-8B shape at 400k tokens, and as much again for their gradients). Above
# one piece's worth of tokens the patched MLP therefore runs over pieces of the token dimension
# (:class:`ChunkedMLPFunction`): the forward keeps only its input, and the backward recomputes one piece's
# intermediates at a time, at the price of one more MLP forward per layer. Shorter inputs run whole, with
# autograd keeping the intermediates as usual. The switch is at one piece because there the two hold the same
# (the whole MLP's intermediates and gradients at T tokens, one piece's at T tokens), so the memory a length needs
# never drops as the length grows: for the 8B shape, pieces of 16,384 tokens above 16,384 (8 x 2048 runs whole).
#
# In a layer whose forward the backward replays anyway (checkpointing "full" or "offload") the pieces cost no
# extra forward: the replay stops as soon as it has rebuilt what the layer saved (torch.utils.checkpoint's early
# stop), and the chunked MLP saves its input before it computes anything (its node is made first and filled in
# after), so the replay never runs the MLP; the MLP's backward then runs each piece's forward once, as the replay
# would have. Only the 4-bit weights are dequantized once per piece instead of once per pass. The memory plan
# therefore gives recomputed layers smaller pieces (:func:`recompute_chunk_rows`: at most 256 MiB per [piece,
# intermediate] activation and at least two pieces, so 2 x 1024 at 1 x 2048 tokens and 2 x 8192 at 8 x 2048 for
# the 8B shape), set per layer by :func:`set_planned_mlp_rows`.

MLP_CHUNK_BYTES = 512 * 2**20  # one [piece, intermediate] activation: sets the tokens per piece
MLP_WHOLE_CHUNKS = 1  # inputs of at most this many pieces' worth of tokens run whole
MLP_MIN_ROWS = 1024  # no piece is shorter (below, the 4-bit dequantization per piece outweighs the matmuls)
RECOMPUTE_CHUNK_BYTES = 256 * 2**20  # the same, in layers that are recomputed
MLP_CHUNK_ATTR = "_kbit_mlp_chunk_rows"  # on each patched MLP: None automatic, 0 never, n: pieces of n above n
MLP_PLAN_ATTR = "_kbit_mlp_plan_rows"  # the memory plan's pieces for its layer (None: none), below MLP_CHUNK_ATTR


def _swiglu_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _fused_gate_up_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # strided halves: the kernel reads them in place
    return self.down_proj(swiglu(gate, up))


def _mlp_forward(self: nn.Module, x: torch.Tensor, body) -> torch.Tensor:
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rows = mlp_chunk_rows(self, x.numel() // max(1, x.shape[-1]), dtype)
    if rows is None:
        return body(self, x)
    return chunked_apply(functools.partial(body, self), x, rows, list(self.parameters()))


def mlp_chunk_rows(mlp: nn.Module, tokens: int, dtype: torch.dtype, planned: bool = True) -> int | None:
    """Tokens per piece a patched MLP runs an input of ``tokens`` tokens in (activations in ``dtype``), or None when
    it runs whole: as :func:`mlp_chunking` forces, else (with ``planned``) as the memory plan set for its layer
    (:func:`set_planned_mlp_rows`; pieces of n above n), else pieces of ``MLP_CHUNK_BYTES`` per [chunk,
    intermediate] activation (a power of two, at least 1024 tokens) once the input exceeds ``MLP_WHOLE_CHUNKS`` of
    them."""
    forced = getattr(mlp, MLP_CHUNK_ATTR, None)
    if forced is None and planned:
        forced = getattr(mlp, MLP_PLAN_ATTR, None)
    if forced is not None:
        return forced if 0 < forced < tokens else None
    return auto_chunk_rows(tokens, mlp.down_proj.in_features, dtype.itemsize)  # in_features: the intermediate size


def auto_chunk_rows(tokens: int, intermediate: int, itemsize: int) -> int | None:
    """The automatic rule of :func:`mlp_chunk_rows` for an MLP of ``intermediate`` features (also the estimate's)."""
    rows = mlp_piece_rows(intermediate, itemsize)
    return rows if tokens > MLP_WHOLE_CHUNKS * rows else None


def mlp_piece_rows(intermediate: int, itemsize: int, piece_bytes: int = MLP_CHUNK_BYTES) -> int:
    """Tokens per MLP piece of ``piece_bytes`` per [piece, intermediate] activation: a power of two, >= 1024."""
    rows = max(MLP_MIN_ROWS, piece_bytes // (intermediate * itemsize))
    return 1 << (rows.bit_length() - 1)


def recompute_chunk_rows(tokens: int, intermediate: int, itemsize: int) -> int | None:
    """Tokens per MLP piece in a recomputed layer at ``tokens`` tokens (None: whole): ``RECOMPUTE_CHUNK_BYTES`` per
    [piece, intermediate] activation and at most half the tokens, a power of two, at least ``MLP_MIN_ROWS``."""
    half = 1 << max(0, (tokens // 2).bit_length() - 1)  # the largest power of two <= tokens / 2
    rows = max(MLP_MIN_ROWS, min(mlp_piece_rows(intermediate, itemsize, RECOMPUTE_CHUNK_BYTES), half))
    return rows if tokens > rows else None


def patched_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP modules of ``model`` whose forward :func:`apply_fast_path` replaced (the ones that can chunk)."""
    return [m for m in model.modules() if hasattr(m, MLP_CHUNK_ATTR)]


def set_planned_mlp_rows(module: nn.Module, rows: int | None) -> int:
    """From now on ``module``'s patched MLPs (a decoder layer's, or a model's) run inputs longer than ``rows`` tokens
    in pieces of ``rows`` (None: their automatic rule), unless :func:`mlp_chunking` forces otherwise; how many."""
    if rows is not None and rows <= 0:
        raise ValueError(f"set_planned_mlp_rows: rows must be a positive number of tokens or None, got {rows}")
    mlps = patched_mlps(module)
    for m in mlps:
        setattr(m, MLP_PLAN_ATTR, rows)
    return len(mlps)


@contextlib.contextmanager
def mlp_chunking(model: nn.Module, rows: int | None):
    """Within the block, ``model``'s patched MLPs split inputs longer than ``rows`` tokens into pieces of ``rows``
    (0: never split; None: the rule of :func:`mlp_chunk_rows`, the memory plan's pieces included)."""
    if rows is not None and rows < 0:
        raise ValueError(f"mlp_chunking: rows must be >= 0 or None, got {rows}")
    mlps = patched_mlps(model)
    before = [getattr(m, MLP_CHUNK_ATTR) for m in mlps]
    for m in mlps:
        setattr(m, MLP_CHUNK_ATTR, rows)
    try:
        yield
    finally:
        for m, b in zip(mlps, before, strict=True):
            setattr(m, MLP_CHUNK_ATTR, b)


def chunked_apply(fn, x: torch.Tensor, rows: int, params: list[torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` ([..., H] -> [..., H], no mixing across tokens, the width kept), computed over
    pieces of ``rows`` tokens; with gradients, only x is kept for the backward (:class:`ChunkedMLPFunction`).
    ``params`` are the tensors ``fn`` uses that may need gradients (those that do not are left out)."""
    trainable = [p for p in params if p.requires_grad]
    if not (torch.is_grad_enabled() and (x.requires_grad or trainable)):
        return _chunked_forward(fn, x, rows)[0]
    # The node first, saving x; its output is filled in after. A checkpoint's replay of this layer stops when x
    # is saved (all the layer saved is rebuilt by then), before any piece runs: the backward runs them.
    out = ChunkedMLPFunction.apply(fn, rows, x, *trainable)
    with torch.no_grad():
        _, dtype = _chunked_forward(fn, x.detach(), rows, out.detach())
    # Under autocast the node cannot tell x's dtype from the autocast one in advance: it made the wider.
    return out if dtype in (None, out.dtype) else out.to(dtype)


def _chunked_forward(
    fn, x: torch.Tensor, rows: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.dtype | None]:
    """(``fn`` over pieces of ``rows`` tokens written into one output: ``out``, or one made for the first piece;
    the dtype the pieces came out in, None for no token)."""
    x2 = x.reshape(-1, x.shape[-1])
    out2 = None if out is None else out.view(-1, out.shape[-1])
    dtype = None
    for lo in range(0, x2.shape[0], rows):
        y = fn(x2[lo : lo + rows])
        if out is None:
            out = y.new_empty((*x.shape[:-1], y.shape[-1]))
            out2 = out.view(-1, y.shape[-1])
        elif y.shape[-1] != out2.shape[-1] or torch.promote_types(y.dtype, out2.dtype) != out2.dtype:
            raise RuntimeError(
                f"chunked MLP: a piece came out [..., {y.shape[-1]}] {y.dtype}, which its output [..., "
                f"{out2.shape[-1]}] {out2.dtype} cannot hold; run this model's MLP whole (mlp_chunking(model, 0))"
            )
        out2[lo : lo + rows] = y
        dtype = y.dtype
    return out, dtype


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    kinds = [device_type] if device_type == "cpu" else [device_type, "cpu"]
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in kinds]


class ChunkedMLPFunction(torch.autograd.Function):
    """y = fn(x) over pieces of the token dimension, keeping only x (not fn's intermediates) for the backward.

    The forward saves x and returns y uninitialised; :func:`chunked_apply` fills it in piece by piece right after,
    without gradients (so that a checkpoint's replay, which stops once x is saved, never runs the pieces). y is
    [..., H] (fn keeps the width) in x's dtype, or under autocast the wider of x's and the autocast dtype.
    The backward replays each piece's forward with the forward's RNG state (so LoRA dropout draws the same masks)
    and autocast state, then backpropagates that piece alone: one piece's intermediates and their gradients exist
    at a time. Gradients of ``params`` (the MLP's trainable tensors, passed as inputs so that autograd routes them
    as it would the unchunked MLP's) are summed over pieces in float32 and returned once. x is saved through
    ``save_for_backward``, so checkpointing, offload and the memory plan's probe see it as any other saved input.
    Under "selective" checkpointing the policy still caches every piece's long matmul outputs (it sees the ops,
    not the pieces), so pieces save memory under "none", "full" and "offload", the modes the memory plan picks.
    """

    @staticmethod
    def forward(ctx, fn, rows, x, *params):
        ctx.fn, ctx.rows, ctx.params = fn, rows, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        # Inside a CUDA graph capture no RNG state is kept: the graph refuses dropout (kbit.train.cuda_graph).
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        ctx.rng = (
            None if capturing else (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        )
        ctx.save_for_backward(x)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.promote_types(dtype, torch.get_autocast_dtype(x.device.type))
        return x.new_empty(x.shape, dtype=dtype)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_dx, need_params = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        params = [p for p, need in zip(ctx.params, need_params, strict=True) if need]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_dx else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        with contextlib.ExitStack() as stack:
            if ctx.rng is not None:
                cpu_rng, dev_rng = ctx.rng
                stack.enter_context(torch.random.fork_rng(devices=[x.device] if dev_rng is not None else []))
                torch.set_rng_state(cpu_rng)
                if dev_rng is not None:
                    torch.cuda.set_rng_state(dev_rng, x.device)
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=ctx.autocast_cache)
                )
            stack.enter_context(torch.enable_grad())
            for lo in range(0, x2.shape[0], ctx.rows):  # forward order: the RNG draws what the forward drew
                xc = x2[lo : lo + ctx.rows].detach().requires_grad_(need_dx)
                y = ctx.fn(xc)
                inputs = ([xc] if need_dx else []) + params
                if not inputs or not y.requires_grad:
                    continue
                grads = torch.autograd.grad(y, inputs, dy2[lo : lo + ctx.rows].to(y.dtype), allow_unused=True)
                if need_dx:
                    dx[lo : lo + ctx.rows] = grads[0]
                for i, g in enumerate(grads[1 if need_dx else 0 :]):
                    if g is not None:
                        acc = g.to(torch.promote_types(g.dtype, torch.float32))
                        sums[i] = acc if sums[i] is None else sums[i].add_(acc)
                del y, grads
        it = iter(s.to(p.dtype) if s is not None else None for s, p in zip(sums, params, strict=True))
        param_grads = tuple(next(it) if need else None for need in need_params)
        return None, None, None if dx is None else dx.view(x.shape), *param_grads


def _patch_mlps(model: nn.Module, family: Family) -> int:
    name, count = f"{family.prefix}MLP", 0
    body = _fused_gate_up_mlp if family.fused_gate_up else _swiglu_mlp
    for module in model.modules():
        if type(module).__name__ == name:
            module.forward = types.MethodType(functools.partial(_mlp_forward, body=body), module)
            setattr(module, MLP_CHUNK_ATTR, None)
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
        max_chunk_rows=getattr(self, LOSS_CHUNK_ATTR, None),
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
