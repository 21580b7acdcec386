"""The memory plan: which decoder layers keep their activations, which recompute them, which offload their inputs.

Recomputation is a third of a checkpointed step's FLOPs, so the fastest step recomputes as few layers as the GPU's
memory allows. The plan is chosen per decoder layer from three costs at the batch's shape, one layer each:

- "none" holds ``keep`` bytes (everything autograd saves in the layer, its input included);
- "full" holds ``input`` bytes (the layer's input) and rebuilds ``keep`` during its backward;
- "offload" holds nothing on the GPU (the input waits in pinned host memory) and rebuilds the same way.

``keep`` is measured, not modelled: a probe runs the first decoder layer's forward once at the batch's shape
(under the same autocast and patches as training) and adds up the bytes of the distinct storages autograd saves,
leaving out parameters, buffers and the tensors shared by all layers (rotary tables, mask). So the fused kernels,
LoRA dropout masks and the attention implementation are counted as they are. Above ``PROBE_TOKENS`` tokens (long
contexts, where one layer's activations alone may not fit twice) it probes one sequence of ``PROBE_TOKENS`` and one
of half that, and extrapolates ``a·T + c·T²`` per sequence (c > 0 only for attention that stores T x T scores).
When the batch is long enough for the patched MLP to run in pieces (:func:`kbit.models.patch.mlp_chunk_rows`), the
probes run it in pieces too (a chunked MLP saves only its input, whatever the piece size), and ``workspace`` counts
what its backward holds for one piece: the piece's intermediates, measured as the unchunked minus the chunked probe
at one piece's length, and as much again for their gradients.

Kept layers come last: the backward frees them before it reaches the first recomputed layer, so the peak is the
larger of (kept x keep + recomputed x input) at the end of the forward and (recomputed x input + keep) during a
recomputation, plus one layer's ``keep`` of backward temporaries and ``workspace``, plus the input being prefetched
when offloading.
"speed" keeps as many layers as fit and recomputes the rest; when even that does not fit it offloads the first
layers' inputs, as few as needed. "memory" offloads every layer. The other modes apply one mode to every layer.

A plan also sets how the recomputed layers ("full", "offload") run their patched MLP: in pieces of at most 256 MiB
per [piece, intermediate] activation and at least two (:func:`kbit.models.patch.recompute_chunk_rows`), which in
a recomputed layer costs no extra forward (the patch module says why) and leaves one piece's intermediates alive
instead of the whole input's. The chooser still counts the automatic pieces (:func:`measure_layer_cost`), which
hold at least as much: the plan errs on the safe side. "memory" also runs the fused LM-head loss in chunks of an
eighth of the batch's tokens (:func:`memory_loss_rows`): at one sequence of 2,048 the default 256 MiB chunk of
logits would be the step's peak, larger than a recomputed layer. :func:`apply_plan` applies every part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import MODES, decoder_layers, set_checkpointing
from .patch import (
    mlp_chunk_rows,
    mlp_chunking,
    patched_mlps,
    recompute_chunk_rows,
    set_loss_chunk_rows,
    set_planned_mlp_rows,
    uses_fused_loss,
)

log = logging.getLogger("kbit")
GIB = 2**30
PLAN_MODES = ("speed", "memory", *MODES)  # what plan_memory takes ("auto" is resolved by the caller)
MARGIN_FRACTION = 0.05  # of the free memory: allocator fragmentation and what the count leaves out
MARGIN_BYTES = GIB // 2  # at least this much (CUDA/cuBLAS workspaces created by the first step)
PROBE_TOKENS = 16384  # the largest probe; longer batches are extrapolated from two probes
LOGIT_BYTES = 10  # per logit without the fused loss: bf16 logits, their float32 copy and its gradient (as estimate)
MIN_LOSS_ROWS = 256  # the smallest fused-loss chunk plan "memory" sets
# Plan "memory" rebuilds a recomputed layer's larger 4-bit weights this much at a time in the fused LoRA nodes: the
# 112 MiB dense weight of a Llama-3-8B MLP projection was the largest tensor of a 1 x 2048 step's peak. The pieces
# cost launches, not bytes or FLOPs (each row of W is dequantized once either way).
WEIGHT_PIECE_BYTES = 32 * 2**20
RECOMPUTED = ("full", "offload")  # modes whose layer forward the backward replays (selective replays only cheap ops)


@dataclass(frozen=True)
class LayerCost:
    """Bytes one decoder layer holds from its forward to its backward, at one batch shape."""

    keep: int  # run without checkpointing: every distinct storage autograd saves in it (its input included)
    input: int  # checkpointed: its input only
    workspace: int = 0  # a chunked MLP's backward: one piece's recomputed intermediates and their gradients


@dataclass(frozen=True)
class MemoryPlan:
    """A mode per decoder layer (first to last) and the one line that says what was chosen and why."""

    modes: tuple[str, ...]
    line: str
    mlp_rows: int | None = None  # tokens per patched-MLP piece in the recomputed layers (None: the automatic rule)
    loss_rows: int | None = None  # tokens per chunk of the fused LM-head loss (None: its 256 MiB rule)
    weight_piece_bytes: int | None = None  # recomputed layers rebuild larger 4-bit weights in row pieces this big


def needed_bytes(modes: tuple[str, ...] | list[str], cost: LayerCost) -> int:
    """Peak activation bytes of a plan whose kept layers come last (the module docstring derives it)."""
    kept, offloaded = modes.count("none"), modes.count("offload")
    held = len(modes) - kept - offloaded  # "full" and "selective" (counted as full: its saves vary by op)
    recomputes = kept < len(modes)
    peak = max(kept, 1 if recomputes else 0) * cost.keep + held * cost.input
    # + backward temporaries (+ the next input)
    return peak + cost.keep + cost.workspace + (cost.input if offloaded else 0)


def choose_plan(n_layers: int, cost: LayerCost, budget: int) -> tuple[tuple[str, ...], bool]:
    """(the fastest modes that fit ``budget`` activation bytes, whether they fit): as many "none" layers as fit
    (the last ones), the rest "full"; when all-"full" does not fit, the first layers "offload", as few as fit."""
    for kept in range(n_layers, -1, -1):
        modes = ("full",) * (n_layers - kept) + ("none",) * kept
        if needed_bytes(modes, cost) <= budget:
            return modes, True
    for offloaded in range(1, n_layers + 1):
        modes = ("offload",) * offloaded + ("full",) * (n_layers - offloaded)
        if needed_bytes(modes, cost) <= budget:
            return modes, True
    return ("offload",) * n_layers, False


class _Captured(Exception):
    """Raised by the probe's pre-hook: the first layer's inputs are in hand, the rest of the forward is skipped."""


def measure_layer_cost(
    model: nn.Module,
    batch: int,
    seq_len: int,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    max_tokens: int = PROBE_TOKENS,
) -> LayerCost:
    """The first decoder layer's :class:`LayerCost` at ``batch`` x ``seq_len`` tokens: measured by one forward up to
    ``max_tokens`` tokens, else extrapolated from sequences of ``max_tokens`` and half as many tokens; with the
    patched MLP's pieces (and their backward ``workspace``) when it runs in pieces at that size."""
    tokens = batch * seq_len
    rows = _mlp_rows(model, tokens, autocast)  # forced or automatic: a kept layer's, not a plan's recomputed ones
    if rows is None:
        with mlp_chunking(model, 0):  # whole, whatever pieces an applied plan gave this layer
            return _layer_cost(model, batch, seq_len, autocast, max_tokens)
    # The probes are shorter than the batch: they split the MLP too (into a few pieces, whatever the real size).
    with mlp_chunking(model, max(1, min(tokens, max_tokens) // 4)):
        cost = _layer_cost(model, batch, seq_len, autocast, max_tokens)
    w = min(rows, max_tokens)  # one piece (or as much of it as a probe may hold), whole minus split
    with mlp_chunking(model, 0):
        whole = _probe(model, 1, w, autocast).keep
    with mlp_chunking(model, max(1, w // 2)):
        split = _probe(model, 1, w, autocast).keep
    workspace = 2 * max(0, whole - split) * rows // w  # the piece's intermediates and their gradients
    return LayerCost(cost.keep, cost.input, workspace)


def _mlp_rows(model: nn.Module, tokens: int, autocast) -> int | None:
    """Tokens per piece of the first decoder layer's patched MLP at ``tokens`` tokens, as forced or by the automatic
    rule, ignoring a plan's pieces (None: unpatched or whole)."""
    mlp_dtype = _mlp_dtype(model, autocast)
    if mlp_dtype is None:
        return None
    mlp, dtype = mlp_dtype
    return mlp_chunk_rows(mlp, tokens, dtype, planned=False)


def _mlp_dtype(model: nn.Module, autocast) -> tuple[nn.Module, torch.dtype] | None:
    """(the first decoder layer's patched MLP, the dtype its activations are in), None without one."""
    layer = decoder_layers(model)[0]
    mlps = patched_mlps(layer)
    if not mlps:
        return None
    device = next(layer.parameters()).device
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    dtype = hf.get_input_embeddings().weight.dtype  # what the layers compute in without autocast
    with (autocast or contextlib.nullcontext)():
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
    return mlps[0], dtype


def recompute_rows(model: nn.Module, tokens: int, autocast=None) -> int | None:
    """Tokens per patched-MLP piece a plan gives its recomputed layers at ``tokens`` tokens (None: whole, or no
    patched MLP): :func:`kbit.models.patch.recompute_chunk_rows` for the model's intermediate size and dtype."""
    mlp_dtype = _mlp_dtype(model, autocast)
    if mlp_dtype is None:
        return None
    mlp, dtype = mlp_dtype
    return recompute_chunk_rows(tokens, mlp.down_proj.in_features, dtype.itemsize)


def _layer_cost(model: nn.Module, batch: int, seq_len: int, autocast, max_tokens: int) -> LayerCost:
    if batch * seq_len <= max_tokens or max_tokens < 2:
        return _probe(model, batch, seq_len, autocast)
    s2 = min(seq_len, max_tokens)
    s1 = s2 // 2
    k1, k2 = _probe(model, 1, s1, autocast).keep, _probe(model, 1, s2, autocast).keep
    c = max(0.0, (k2 - 2 * k1) / (2 * s1 * s1))  # bytes per token pair (T x T scores), else 0
    a = (k1 - c * s1 * s1) / s1  # bytes per token
    per_token_input = _probe(model, 1, 1, autocast).input
    return LayerCost(keep=int(batch * (a * seq_len + c * seq_len**2)), input=batch * seq_len * per_token_input)


def _probe(model: nn.Module, batch: int, seq_len: int, autocast) -> LayerCost:
    layer = decoder_layers(model)[0]
    autocast = autocast or contextlib.nullcontext
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    device = next(layer.parameters()).device  # where training runs (the embedding table may be in host memory)
    ids = torch.zeros((batch, seq_len), dtype=torch.long, device=device)
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), autocast():
            model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    hidden = args[0].detach().requires_grad_(True)  # every layer but the first gets an input that carries grad
    shared = [t for t in torch.utils._pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor)]
    shared += [*model.parameters(), *model.buffers()]
    skip = {t.untyped_storage().data_ptr() for t in shared}
    saved: dict[int, torch.Tensor] = {}  # storage -> a tensor on it, held so that no address is reused meanwhile

    def pack(t: torch.Tensor) -> int:
        # The graph gets the address, not the tensor: an op's own output saved back into its node would make a
        # cycle through C++ (tensor -> node -> tensor) that Python's collector never frees, leaking the layer's
        # activations. The dict holds the tensors until they are counted, so no address is reused meanwhile.
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t
        return ptr

    training, checkpointed = layer.training, getattr(layer, "gradient_checkpointing", False)
    layer.train()  # dropout masks are saved in training only
    layer.gradient_checkpointing = False
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad(), autocast():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda ptr: None):
                out = layer(hidden, *args[1:], **kwargs)
        del out
    finally:
        layer.train(training)
        layer.gradient_checkpointing = checkpointed
    keep = sum(t.untyped_storage().nbytes() for t in saved.values())
    saved.clear()  # the tensors keep the layer's graph alive (a layer's activations: gigabytes at training shapes)
    return LayerCost(keep=keep, input=hidden.untyped_storage().nbytes())


def free_device_bytes(device: torch.device) -> int:
    """Bytes a CUDA device can still give this process: free on the device plus what torch's allocator caches."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def step_bytes(model: nn.Module, batch: int, seq_len: int, optimizer_bytes: float, fused_loss: bool) -> int:
    """GPU bytes a training step still allocates besides activations: trainable gradients, optimizer state
    (``optimizer_bytes`` per trainable parameter) and the loss (one chunk with the fused loss, else all logits)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(p.numel() for p in trainable) * optimizer_bytes
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tokens = batch * seq_len
    if fused_loss:
        from ..kernels.loss import CHUNK_BYTES

        loss = CHUNK_BYTES + tokens * config.hidden_size * 4  # one chunk's logits (its gradient in place), dh
    else:
        loss = tokens * config.vocab_size * LOGIT_BYTES
    return int(grads + state + loss)


def plan_memory(
    model: nn.Module,
    mode: str,
    batch: int,
    seq_len: int,
    *,
    free_bytes: int | None = None,
    reserve_bytes: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    why: str = "as configured",
    weight_pieces: bool = False,
) -> MemoryPlan:
    """The memory plan of ``mode`` for ``model`` at ``batch`` x ``seq_len``; logs and returns it.

    ``speed`` chooses from ``free_bytes`` (default: the CUDA device's free memory; on a CPU without it, every
    layer keeps its activations) less ``reserve_bytes`` (the step's other allocations, :func:`step_bytes`) and
    a safety margin. ``memory`` offloads every layer; a mode of :data:`checkpointing.MODES` applies to all (the
    line says ``why``). With recomputed layers and a patched MLP, ``mlp_rows`` is their MLP's piece size (the line
    leaves it out: :func:`apply_plan`, which sets it on ``model``, says it). ``weight_pieces`` (plan ``memory``
    only) also rebuilds the recomputed layers' larger 4-bit weights in row pieces of ``WEIGHT_PIECE_BYTES``: worth
    it when the step runs as a CUDA graph, where the extra launches cost nothing; eager, they cost host time.
    Nothing is changed on ``model`` here.
    """
    if mode not in PLAN_MODES:
        raise ValueError(f"memory plan must be one of {', '.join(PLAN_MODES)}, got {mode!r}")
    n = len(decoder_layers(model))
    if n == 0 and mode not in ("none", "speed"):
        raise ValueError(
            f"memory plan {mode}: {type(model).__name__} has no transformers decoder layers "
            "(GradientCheckpointingLayer) to checkpoint; use none"
        )
    if n == 0:
        plan = MemoryPlan((), f"memory plan: none ({type(model).__name__} has no transformers decoder layers)")
    elif mode in MODES:
        plan = MemoryPlan((mode,) * n, f"memory plan: {mode} on all {n} layers, {why}")
    elif mode == "memory":
        plan = MemoryPlan(("offload",) * n, f"memory plan: memory, all {n} layers recomputed from CPU-offloaded inputs")
    else:
        device = next(decoder_layers(model)[0].parameters()).device
        if free_bytes is None and device.type != "cuda":
            plan = MemoryPlan(("none",) * n, f"memory plan: all {n} layers kept ({device.type}: no GPU memory to plan)")
        else:
            plan = _speed_plan(model, n, batch, seq_len, free_bytes, reserve_bytes, autocast, device)
    if any(m in RECOMPUTED for m in plan.modes):
        plan = MemoryPlan(plan.modes, plan.line, recompute_rows(model, batch * seq_len, autocast))
    if mode == "memory" and uses_fused_loss(model):
        plan = dataclasses.replace(plan, loss_rows=memory_loss_rows(batch * seq_len))
    if mode == "memory" and weight_pieces:
        plan = dataclasses.replace(plan, weight_piece_bytes=WEIGHT_PIECE_BYTES)
    log.info(plan.line)
    return plan


def apply_plan(model: nn.Module, plan: MemoryPlan) -> str:
    """Apply ``plan`` to ``model``: each decoder layer's checkpointing mode, and the MLP pieces of the recomputed
    layers (the others get the automatic rule back); returns a line saying both."""
    line = set_checkpointing(model, plan.modes)
    pieced = 0
    for layer, mode in zip(decoder_layers(model), plan.modes, strict=True):
        rows = plan.mlp_rows if mode in RECOMPUTED else None
        mlps = set_planned_mlp_rows(layer, rows)
        if rows is not None:
            pieced += mlps
    if pieced:
        line += f"; the MLP of {pieced} recomputed layer{'s' * (pieced > 1)} in pieces of {plan.mlp_rows} tokens"
    set_loss_chunk_rows(model, plan.loss_rows)
    if plan.loss_rows is not None:
        line += f"; the loss in chunks of at most {plan.loss_rows} tokens"
    pieced = set_weight_pieces(model, plan.modes, plan.weight_piece_bytes)
    if pieced:
        line += (f"; {pieced} weight{'s' * (pieced > 1)} over {plan.weight_piece_bytes / 2**20:.0f} MiB dequantized "
                 "in row pieces of that size")  # fmt: skip
    return line


def weight_piece_rows(base: nn.Module, piece_bytes: int) -> int | None:
    """Rows per dequantized piece of ``base``'s weight for pieces of ``piece_bytes`` (a multiple of 16 rows: whole
    tensor-core tiles), or None when the whole weight is that small."""
    itemsize = torch.empty((), dtype=base.compute_dtype).element_size()
    rows = piece_bytes // (base.in_features * itemsize) // 16 * 16
    return rows if 0 < rows < base.out_features else None


def set_weight_pieces(model: nn.Module, modes: tuple[str, ...], piece_bytes: int | None) -> int:
    """Set ``dequant_rows`` of the 4-bit weights of ``model``'s recomputed decoder layers for row pieces of
    ``piece_bytes`` (None: whole weights everywhere); how many weights are pieced."""
    from ..nn import Linear4bit

    count = 0
    for layer, mode in zip(decoder_layers(model), modes, strict=True):
        for m in layer.modules():
            if isinstance(m, Linear4bit):
                rows = weight_piece_rows(m, piece_bytes) if piece_bytes and mode in RECOMPUTED else None
                m.dequant_rows = rows
                count += rows is not None
    return count


def memory_loss_rows(tokens: int) -> int:
    """Tokens per fused-loss chunk under plan "memory": a power of two near an eighth of ``tokens``, at least 256.

    Smaller chunks cost one read of the LM head each (at 256 rows the head's matmul is still compute-bound on an
    H100), so they shrink with the batch only as far as its recomputed layers' memory shrinks with it.
    """
    rows = max(MIN_LOSS_ROWS, tokens // 8)
    return 1 << (rows.bit_length() - 1)


def _speed_plan(model, n, batch, seq_len, free_bytes, reserve_bytes, autocast, device) -> MemoryPlan:
    cost = measure_layer_cost(model, batch, seq_len, autocast)
    free = free_device_bytes(device) if free_bytes is None else free_bytes
    margin = max(MARGIN_BYTES, int(MARGIN_FRACTION * free))
    modes, fits = choose_plan(n, cost, free - reserve_bytes - margin)
    counts = [(modes.count("none"), "kept"), (modes.count("full"), "recomputed")]
    counts.append((modes.count("offload"), "recomputed from CPU-offloaded inputs"))
    what = ", ".join(f"{k} layer{'s' if k != 1 else ''} {label}" for k, label in counts if k)
    why = (
        f"free {free / GIB:.1f} GiB, {reserve_bytes / GIB:.1f} GiB reserved for the step, {cost.keep / GIB:.2f} GiB "
        f"per kept layer, {cost.input / GIB:.2f} GiB per recomputed one at {batch}x{seq_len}"
    )
    if cost.workspace:
        why += f", MLP in pieces: {cost.workspace / GIB:.2f} GiB for one piece's backward"
    if not fits:
        need = needed_bytes(modes, cost) + reserve_bytes + margin
        why += f"; does not fit: needs {need / GIB:.1f} GiB, lower the batch size or sequence length"
    return MemoryPlan(modes, f"memory plan: {what} ({why})")
