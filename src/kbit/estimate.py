"""GPU memory estimate of a QLoRA fine-tune, split into weights / adapters / optimizer / activations / logits.

The model's exact layer shapes come from a skeleton built on the ``meta`` device (no weights are read). Activation
bytes are counted per token and decoder layer from what autograd keeps for a pre-norm decoder layer with LoRA on its
linears (bf16 activations, float32 norm inputs, SDPA/flash attention that stores no S x S matrix):

- attention half: norm input (fp32, 4h bytes), norm output (2h), q/k/v after rotary (2h + 4kv), attention output (2h)
- MLP half: norm input (4h), norm output (2h), gate and up outputs (4m), activation and product (4m)
- LoRA: the r-wide A outputs of every adapted linear (2r each)

With gradient checkpointing only each layer's input (2h) is kept, plus one layer's worth during its recomputation;
activation offload (kbit train's ``memory_plan: memory``) moves those layer inputs to host memory, leaving two on
the GPU (the one being recomputed and the one prefetched). The head's logits cost 2 (bf16) + 4 (fp32 for the
loss) + 4 (their gradient) bytes each, for one micro-batch. A fixed allowance covers the CUDA context, cuBLAS
workspaces and allocator slack.

Per GPU of N (``world_size``): ``ddp`` holds a whole model per GPU plus DDP's gradient buckets. ``fsdp`` is what
kbit.dist does: packed 4-bit weights, embeddings, head and norms sharded 1/N; quantization statistics replicated
(buffers); LoRA as fp32 master shards with fp32 gradient shards and sharded optimizer state; and, gathered whole
during the step, the root unit (embeddings, head, final norm: FSDP keeps it through forward and backward) and two
decoder layers (the one computing and the one prefetched). ``cpu_offload`` moves the shards, their gradients and
the optimizer state to pinned host memory (``host``, not in the GPU total). ``kbit estimate`` prints the split
and the largest batch that fits a given memory; docs/estimate.md records the comparison with measured runs.

Long context (:func:`long_context`, :func:`longest_seq_len`, ``kbit estimate --longest``) models what ``kbit train``
does on a GPU instead: the fast path (fused kernels, chunked LM-head loss, the MLP run in pieces at long inputs) and
``memory_plan: speed``, whose chooser (:func:`kbit.models.memory_plan.choose_plan`) it calls with the bytes per
layer the plan's probe measures, counted per token: seven [T, hidden] activations (the input, two norm outputs, q
after RoPE, the attention output, the residual sum; ``q``/``k``/``v`` projections and the attention kernel share
them), k after RoPE and v, the rank-r LoRA inputs of the attention projections, the attention's float32 logsumexp
per head and two float32 norm statistics; the MLP's gate, up and product with their LoRA inputs only while it runs
whole (tests/test_estimate.py holds this count to the probe's). Offloaded layer inputs take pinned host memory,
each exactly its bytes to the page (:class:`kbit.models.offload.HostBuffer`), plus an allowance for the process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

OVERHEAD_BYTES = 600 * 2**20  # CUDA context + cuBLAS/cuDNN workspaces + allocator fragmentation
STRATEGIES = ("none", "ddp", "fsdp")
OPTIMIZER_BYTES = {  # per trainable parameter, as held on the GPU
    "adamw": 8.0,  # two float32 moments
    "paged_adamw": 0.0,  # moments live in pinned host memory; one chunk at a time on the GPU (ignored)
    "adamw_8bit": 2.0 + 8.0 / 256,  # two uint8 moments + a float32 absmax per 256-block each
    "paged_adamw_8bit": 0.0,
}


PARTS = ("weights", "gathered", "adapters", "optimizer", "activations", "logits", "overhead")


@dataclass
class Estimate:
    """Bytes of each part of a training step's peak memory on one GPU (host: pinned host memory per rank)."""

    weights: float  # frozen weights held (this GPU's shards + replicated statistics under fsdp)
    adapters: float  # adapter parameters + their gradients
    optimizer: float
    activations: float
    logits: float
    overhead: float
    gathered: float = 0.0  # fsdp: units all-gathered whole during the step (root + two decoder layers)
    host: float = 0.0  # cpu_offload: shards, gradients and optimizer state in host memory (not in total)

    @property
    def total(self) -> float:
        """Everything on the GPU together."""
        return sum(getattr(self, k) for k in PARTS)

    def parts(self) -> list[tuple[str, float]]:
        """(name, bytes) of the GPU parts, ``gathered`` only under fsdp."""
        return [(k, getattr(self, k)) for k in PARTS if k != "gathered" or self.gathered]

    def table(self) -> str:
        """The split as a markdown table in GiB."""
        lines = ["| part | GiB |", "|---|---|"] + [f"| {k} | {v / 2**30:.2f} |" for k, v in self.parts()]
        lines.append(f"| **total** | **{self.total / 2**30:.2f}** |")
        if self.host:
            lines.append(f"| host memory per rank (pinned, not in total) | {self.host / 2**30:.2f} |")
        return "\n".join(lines)


@dataclass
class ModelShape:
    """What the estimate needs to know about a model."""

    linear_shapes: list[tuple[int, int]]  # (out, in) of every linear that is quantized and adapted
    other_params: int  # embeddings, norms, head: kept in 16 bits
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int
    per_layer_linears: int
    heads: int = 0  # attention heads (the attention's float32 logsumexp per head and token)


def model_shape(config) -> ModelShape:
    """Layer shapes of a transformers causal LM config, from a meta-device skeleton."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [(m.out_features, m.in_features) for m in model.modules() if type(m) is nn.Linear and m is not head]
    n_lin = sum(o * i for o, i in linears)
    total = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    layers = text.num_hidden_layers
    return ModelShape(
        linears,
        total - n_lin,
        h,
        getattr(text, "intermediate_size", 4 * h),
        kv * head_dim,
        layers,
        text.vocab_size,
        len(linears) // max(layers, 1),
        heads,
    )


def estimate(
    shape: ModelShape,
    seq_len: int,
    batch: int,
    lora_r: int = 16,
    bits: int = 4,
    optim: str = "adamw",
    gradient_checkpointing: bool = True,
    double_quant: bool = True,
    blocksize: int = 64,
    world_size: int = 1,
    strategy: str = "none",
    cpu_offload: bool = False,
    activation_offload: bool = False,
) -> Estimate:
    """Peak bytes on one GPU of one training step for ``batch`` sequences of ``seq_len`` tokens per GPU."""
    check_plan(optim, world_size, strategy, cpu_offload, activation_offload, gradient_checkpointing, bits)
    lin_bytes = sum(linear_bytes(o, i, bits, double_quant, blocksize) for o, i in shape.linear_shapes)
    lora = sum(lora_r * (o + i) for o, i in shape.linear_shapes)
    h, m, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = (4 * h + 2 * h + 2 * h + 4 * kv + 2 * h) + (4 * h + 2 * h + 4 * m + 4 * m)
    per_layer += 2 * lora_r * shape.per_layer_linears
    tokens = batch * seq_len
    if gradient_checkpointing:  # layer inputs kept on the GPU: all of them, or the two around the current layer
        kept = min(2, shape.layers) if activation_offload else shape.layers
        activations = tokens * (kept * 2 * h + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * 10.0
    if strategy != "fsdp":
        weights = lin_bytes + 2 * shape.other_params
        adapters = lora * (2 + 2)  # bf16 parameters + bf16 gradients
        if strategy == "ddp":
            adapters += lora * 2  # DDP's gradient buckets
        optimizer = lora * OPTIMIZER_BYTES[optim]
        return Estimate(weights, adapters, optimizer, activations, logits, OVERHEAD_BYTES)
    n, layers = world_size, max(shape.layers, 1)
    packed = sum((o * i + 1) // 2 for o, i in shape.linear_shapes) if bits == 4 else lin_bytes
    statistics = lin_bytes - packed  # buffers: replicated on every rank, never offloaded
    sharded = (packed + 2 * shape.other_params) / n
    layer_lora = lora / layers
    # whole during the step: the root unit (embeddings, head, norms) and two layers with their bf16 LoRA
    gathered = 2 * shape.other_params + 2 * (packed / layers + 2 * layer_lora)
    adapters = 4 * layer_lora  # one layer's unsharded fp32 gradient before its reduce-scatter
    shard_state = lora * (4 + 4) / n  # fp32 master shards + fp32 gradient shards
    optimizer = lora * OPTIMIZER_BYTES[optim] / n
    if cpu_offload:
        host = sharded + shard_state + optimizer
        return Estimate(statistics, adapters, 0.0, activations, logits, OVERHEAD_BYTES, gathered, host)
    return Estimate(statistics + sharded, adapters + shard_state, optimizer, activations, logits, OVERHEAD_BYTES,
                    gathered)  # fmt: skip


def check_plan(
    optim: str = "adamw",
    world_size: int = 1,
    strategy: str = "none",
    cpu_offload: bool = False,
    activation_offload: bool = False,
    gradient_checkpointing: bool = True,
    bits: int = 4,
) -> None:
    """ValueError naming the option when the combination cannot run (as kbit train would refuse it)."""
    if optim not in OPTIMIZER_BYTES:
        raise ValueError(f"optim {optim!r} is not known; use one of {sorted(OPTIMIZER_BYTES)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not known; use one of {', '.join(STRATEGIES)}")
    if world_size < 1:
        raise ValueError(f"gpus must be at least 1, got {world_size}")
    if strategy == "none" and world_size > 1:
        raise ValueError(f"strategy none runs one GPU; with {world_size} GPUs use strategy fsdp or ddp")
    if cpu_offload and strategy != "fsdp":
        raise ValueError(f"cpu_offload offloads FSDP shards; strategy {strategy} keeps whole weights: use fsdp")
    if strategy == "fsdp" and optim != "adamw":
        raise ValueError(f"optim {optim} does not run under FSDP in kbit; use adamw with strategy fsdp")
    if strategy == "fsdp" and bits == 8:
        raise ValueError("bits 8: FSDP cannot shard int8 weights; use bits 4, or strategy ddp")
    if activation_offload and not gradient_checkpointing:
        raise ValueError("activation offload moves the checkpointed layer inputs; it needs gradient checkpointing")


def linear_bytes(out_f: int, in_f: int, bits: int = 4, double_quant: bool = True, blocksize: int = 64) -> int:
    """Exact bytes of one frozen linear weight as kbit stores it (packed bytes and every statistic)."""
    n = out_f * in_f
    if bits == 16:
        return 2 * n
    if bits == 8:
        return n + 4 * out_f  # int8 codes + float32 row scales
    blocks = -(-n // blocksize)
    stats = blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 if double_quant else 4 * blocks  # + nested map, offset
    return (n + 1) // 2 + stats + 4 * 16  # + the 16-entry 4-bit table


def largest_batch(shape: ModelShape, memory_bytes: float, seq_len: int, **kw) -> int:
    """The largest batch whose estimate fits ``memory_bytes`` (0 if not even one sequence fits)."""
    b = 0
    while estimate(shape, seq_len, b + 1, **kw).total <= memory_bytes and b < 1 << 16:
        b += 1
    return b


# ---- the longest sequence: kbit train on a GPU (fast path, memory_plan speed) ----

HOST_OVERHEAD_BYTES = 4 * 2**30  # host memory of the training process itself (Python, torch, CUDA libraries)
ATTENTION_ADAPTERS = 4  # q, k, v, o of the adapted linears per layer; the rest are the MLP's


@dataclass
class LongContext:
    """The plan ``kbit train`` picks for one sequence of ``seq_len`` tokens and what it needs (bytes)."""

    seq_len: int
    modes: tuple[str, ...]  # per decoder layer: "none" kept, "full" recomputed, "offload" recomputed from host
    gpu: float  # peak on the GPU: weights, adapters, optimizer, loss, activations, overhead
    host: float  # pinned layer inputs (each its bytes, to the page) + HOST_OVERHEAD_BYTES
    fits_gpu: bool
    fits_host: bool
    mlp_rows: int | None  # tokens per MLP piece (None: the MLP runs whole)

    @property
    def fits(self) -> bool:
        """Both memories suffice."""
        return self.fits_gpu and self.fits_host

    def describe(self) -> str:
        """One line: the plan's layer counts and the two memories in GiB."""
        counts = [(self.modes.count("none"), "kept"), (self.modes.count("full"), "recomputed")]
        counts.append((self.modes.count("offload"), "recomputed from CPU-offloaded inputs"))
        what = ", ".join(f"{k} {label}" for k, label in counts if k)
        mlp = f"MLP in pieces of {self.mlp_rows} tokens" if self.mlp_rows else "MLP whole"
        return f"{what}; {mlp}; GPU {self.gpu / 2**30:.1f} GiB, host {self.host / 2**30:.1f} GiB"


def fast_layer_cost(shape: ModelShape, tokens: int, lora_r: int = 16, itemsize: int = 2, mlp_rows: int | None = None):
    """(One decoder layer's :class:`~kbit.models.memory_plan.LayerCost` on the fast path at ``tokens`` tokens, as the
    memory plan's probe measures it (module docstring), activations of ``itemsize`` bytes; tokens per MLP piece or
    None). ``mlp_rows`` forces the pieces as :func:`kbit.models.patch.mlp_chunking` does (0: whole)."""
    from .models.memory_plan import LayerCost
    from .models.patch import auto_chunk_rows

    h, kv, m = shape.hidden, shape.kv_dim, shape.intermediate
    mlp_adapters = max(0, shape.per_layer_linears - ATTENTION_ADAPTERS)
    per_token = itemsize * (7 * h + 2 * kv + lora_r * min(shape.per_layer_linears, ATTENTION_ADAPTERS))
    per_token += 4 * shape.heads + 2 * 4
    mlp = itemsize * (3 * m + lora_r * mlp_adapters)  # gate, up, silu(gate)·up and the LoRA inputs of the MLP
    if mlp_rows is None:
        rows = auto_chunk_rows(tokens, m, itemsize)
    else:
        rows = mlp_rows if 0 < mlp_rows < tokens else None
    if rows is None:
        return LayerCost(keep=tokens * (per_token + mlp), input=tokens * itemsize * h), None
    return LayerCost(keep=tokens * per_token, input=tokens * itemsize * h, workspace=2 * rows * mlp), rows


def pinned_bytes(nbytes: int) -> int:
    """Host bytes kbit page-locks for an offloaded tensor of ``nbytes``: its bytes rounded up to whole pages (not to
    a power of two, as torch's caching host allocator would: :mod:`kbit.models.offload`)."""
    from .models.offload import registered_bytes

    return registered_bytes(nbytes)


def long_context(
    shape: ModelShape,
    seq_len: int,
    gpu_bytes: float,
    host_bytes: float = float("inf"),
    lora_r: int = 16,
    optim: str = "adamw",
) -> LongContext:
    """The plan ``kbit train`` picks for one sequence of ``seq_len`` tokens on a GPU of ``gpu_bytes`` (fast path,
    ``memory_plan: speed``: as many layers kept as fit, then recomputed, then offloaded) and what it needs."""
    from .kernels.loss import CHUNK_BYTES
    from .models.memory_plan import MARGIN_BYTES, MARGIN_FRACTION, choose_plan, needed_bytes

    base = estimate(shape, seq_len, 1, lora_r=lora_r, optim=optim)
    params = base.adapters / 2  # bf16 adapters (2 bytes) + their gradients (2 bytes): half of it is held before
    free = gpu_bytes - OVERHEAD_BYTES - base.weights - params  # what the plan sees after loading (free_device_bytes)
    loss = 2 * CHUNK_BYTES + seq_len * shape.hidden * 4  # as memory_plan.step_bytes counts the fused loss
    reserve = (base.adapters - params) + base.optimizer + loss
    margin = max(MARGIN_BYTES, int(MARGIN_FRACTION * free))
    cost, rows = fast_layer_cost(shape, seq_len, lora_r)
    modes, fits = choose_plan(shape.layers, cost, int(free - reserve - margin))
    gpu = OVERHEAD_BYTES + base.weights + params + reserve + needed_bytes(modes, cost)
    host = modes.count("offload") * pinned_bytes(cost.input) + HOST_OVERHEAD_BYTES
    return LongContext(seq_len, modes, gpu, host, fits, host <= host_bytes, rows)


def longest_seq_len(
    shape: ModelShape, gpu_bytes: float, host_bytes: float = float("inf"), lora_r: int = 16, optim: str = "adamw"
) -> LongContext | None:
    """The longest single sequence :func:`long_context` fits in both memories (None: not even one token)."""

    from .models.patch import MLP_WHOLE_CHUNKS, mlp_piece_rows

    def fits(t: int) -> bool:
        return long_context(shape, t, gpu_bytes, host_bytes, lora_r, optim).fits

    # Needs grow with the length except where the MLP starts running in pieces (its intermediates leave the
    # layer's saves): search above that point first, then below it.
    whole = MLP_WHOLE_CHUNKS * mlp_piece_rows(shape.intermediate, 2)  # the longest input the MLP runs whole
    lo = whole + 1 if fits(whole + 1) else 1
    if not fits(lo):
        return None
    hi = lo + 1
    while fits(hi) and hi < 1 << 30:  # double, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return long_context(shape, lo, gpu_bytes, host_bytes, lora_r, optim)


PRESETS = {  # well-known shapes, so that an estimate needs no download
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


def load_config(source: str | os.PathLike):
    """A transformers config for a preset name, 'default', a folder, a .gguf file or a Hub id (no weights read)."""
    from transformers import AutoConfig

    from .models.load import resolve_source

    if str(source) in PRESETS:
        kw = dict(PRESETS[str(source)])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    if str(source) != "default" and not os.path.exists(source):
        return AutoConfig.from_pretrained(str(source))  # a Hub id: fetches config.json only
    path = resolve_source(source)
    if path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path)
