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
