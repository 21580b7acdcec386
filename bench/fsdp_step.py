"""Tokens/s and per-GPU peak memory of kbit QLoRA training on 1 and 2 GPUs (FSDP2 or DDP), launched with torchrun.

    torchrun --nproc-per-node 1 bench/fsdp_step.py --preset llama-3-8b --batch 4 --seq-len 2048
    torchrun --nproc-per-node 2 bench/fsdp_step.py --preset llama-3-8b --batch 4 --seq-len 2048 --strategy fsdp
    torchrun --nproc-per-node 2 bench/fsdp_step.py --preset llama-2-70b --layers 2 4 --batch 1 --seq-len 2048 \
        --strategy fsdp
    torchrun --nproc-per-node 2 bench/fsdp_step.py --tiny          # CPU + gloo, a toy shape: checks the script

Each rank builds the same random model (seeded) of the preset's shape on its own device, with ``--layers`` decoder
layers when given (else the preset's count): NF4 + double quant linears packed as bf16 (``quant_storage`` = the
compute dtype, what FSDP shards), LoRA r=16 alpha 32 on all seven projections (fp32 masters). Under ``--strategy
fsdp`` the model is built as kbit train loads one (``--load streamed``): layer by layer, each decoder layer given
its LoRA and sharded as soon as it is quantized (kbit.dist.LayerPlacer), so no rank holds the whole 4-bit model;
``--load whole`` builds it whole first and lets the Trainer shard it (the old path, to compare). Then it runs
``--steps`` optimizer steps of kbit's Trainer (bf16 autocast, non-reentrant gradient checkpointing, torch AdamW,
``per_device_train_batch_size`` = ``--batch`` full-length sequences per GPU, every token a target).

It prints, per rank: the peak memory while building and sharding (``max_memory_allocated`` on a GPU; the most
bytes of model tensors held at once on the CPU), the bytes of one decoder layer's shards, the training peak
(``max_memory_allocated`` over the steps after the first; RSS on the CPU) next to kbit's estimate for the same
shape (``kbit estimate --gpus N --strategy S``), and the median global tokens/s over the steps after the first.
With two or more ``--layers`` values it also fits memory = a + b x layers and time = c + d x layers and
extrapolates them to the preset's full depth: state which numbers were measured and which extrapolated when
quoting them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # the CPU reference quantizer is run eagerly

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from kbit.data import Example  # noqa: E402
from kbit.dist import (  # noqa: E402
    DistContext,
    LayerPlacer,
    close_distributed,
    init_distributed,
    load_sharded,
    match_quant_storage,
)
from kbit.dist.hostmem import peak_rss_gib, reset_peak_rss  # noqa: E402
from kbit.dist.loading import resident_bytes  # noqa: E402
from kbit.estimate import PRESETS, estimate, model_shape  # noqa: E402
from kbit.lora.inject import LoraSettings  # noqa: E402
from kbit.models.load import decoder_layer_paths, load_model  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)  # fmt: skip


def model_config(shape: dict, layers: int | None):
    """The transformers config of ``shape`` with ``layers`` decoder layers (None: the shape's own count)."""
    from transformers import AutoConfig

    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_model(config, ctx: DistContext, dtype: torch.dtype, place=None, seed: int = 0) -> nn.Module:
    """A random model of ``config`` with 4-bit linears (packed as ``dtype``), built on this rank's device one decoder
    layer at a time; ``place(model, path)`` is called as each layer is complete, then with "" (as load_model's
    ``on_layer``: a LayerPlacer adds LoRA and shards there)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)  # the same weights on every rank
    layers = decoder_layer_paths(model)
    for path in layers:
        _materialize(model, model.get_submodule(path), ctx.device, dtype, gen)
        if place is not None:
            place(model, path)
    _materialize(model, model, ctx.device, dtype, gen)  # embeddings, final norm, head
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.device(ctx.device):  # the rotary tables were computed on meta: build them again for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if place is not None:
        place(model, "")
    return model


def _materialize(model: nn.Module, part: nn.Module, device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Give ``part``'s meta parameters random values: linears quantized one at a time, the rest in ``dtype``; frozen."""
    from kbit.nn import Linear4bit
    from kbit.quant import quantize_4bit

    head = model.get_output_embeddings()
    for name, mod in list(part.named_modules()):
        if type(mod) is nn.Linear and mod is not head and mod.weight.is_meta:  # never a dense model in memory
            w = torch.randn(mod.out_features, mod.in_features, device=device, dtype=dtype, generator=gen) * 0.02
            packed, state = quantize_4bit(w, "nf4", 64, True, dtype)  # stored as the compute dtype: FSDP's
            parent, _, child = name.rpartition(".")
            layer = Linear4bit.from_quantized(packed, state, compute_dtype=dtype)
            setattr(part.get_submodule(parent) if parent else part, child, layer)
    for mod in part.modules():  # norms, and at the root the embeddings and the head
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.randn(p.shape, device=device, dtype=dtype, generator=gen) * 0.02
                mod._parameters[pname] = nn.Parameter(torch.ones_like(t) if p.dim() == 1 else t, requires_grad=False)
    match_quant_storage(part, dtype)


def measure(args, ctx: DistContext, layers: int | None, shape: dict) -> dict:
    """One model of ``layers`` layers: (median global tokens/s, step seconds, peak GiB of each rank)."""
    from kbit.lora import add_lora
    from kbit.train import Trainer

    dtype = torch.float32 if args.tiny and args.fp32 else torch.bfloat16
    arch = AutoConfig.from_pretrained(args.model) if args.model else model_config(shape, layers)
    streamed = args.strategy == "fsdp" and args.load == "streamed"
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    reset_peak_rss()
    t0 = time.perf_counter()
    torch.manual_seed(0)  # the LoRA initialisation
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    if streamed and args.model:  # kbit train's load of a checkpoint under fsdp
        model, memory = load_sharded(args.model, ctx, lora, compute_dtype=dtype, cpu_offload=args.cpu_offload)
        load_peak, layer_bytes = memory.peak_model_bytes, memory.layer_bytes[0]
    elif streamed:
        placer = LayerPlacer(ctx, dtype, lora, cpu_offload=args.cpu_offload)
        model = build_model(arch, ctx, dtype, place=placer)
        load_peak, layer_bytes = placer.memory.peak_model_bytes, placer.memory.layer_bytes[0]
    else:
        if args.model:
            model = load_model(args.model, compute_dtype=dtype, quant_storage=dtype, device=ctx.device)
        else:
            model = build_model(arch, ctx, dtype)
        add_lora(model, r=16, alpha=32, dropout=0.0, dtype=torch.float32)
        load_peak, layer_bytes = resident_bytes(model, ctx.device), 0  # the whole model, before any sharding
    if cuda:
        load_peak = torch.cuda.max_memory_allocated(ctx.device)
    host = peak_rss_gib()
    world = ctx.world_size
    if args.load_only:
        return summarize(args, ctx, arch, args.strategy, None, None, time.perf_counter() - t0, load_peak,
                         layer_bytes, streamed, host)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    n = args.batch * world * args.steps
    tokens = torch.randint(1, arch.vocab_size, (n, args.seq_len), generator=gen).tolist()
    examples = [Example(ids, list(ids)) for ids in tokens]  # every token a target
    times: list[float] = []

    def record(trainer, rec) -> None:
        times.append(rec["tokens_per_s"])
        if rec["step"] == 1 and ctx.device.type == "cuda":  # the peak of steps 2.. (step 1 warms the allocator)
            torch.cuda.reset_peak_memory_stats(ctx.device)

    with tempfile.TemporaryDirectory() as out:
        config = dict(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, max_seq_len=args.seq_len,
            learning_rate=1e-4, logging_steps=10**6, save_steps=0, save_total_limit=1, eval_on_start=False,
            report_to="none", strategy=args.strategy, cpu_offload=args.cpu_offload, bf16=dtype == torch.bfloat16,
            gradient_checkpointing=not args.tiny,
        )  # fmt: skip
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        trainer = Trainer(model, None, examples, None, config, callbacks=[record])
        built, strategy = time.perf_counter() - t0, trainer.strategy
        trainer.train()
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del trainer, model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    tok_s = statistics.median(times[1:] or times)
    return summarize(args, ctx, arch, strategy, tok_s, peak, built, load_peak, layer_bytes, streamed, host)


def summarize(args, ctx, arch, strategy, tok_s, peak, built, load_peak, layer_bytes, streamed, host) -> dict:
    """One table row: every rank's numbers (collective) and kbit's estimate for the same run."""
    world = ctx.world_size
    mine = [peak or 0.0, load_peak / 2**30, layer_bytes / 2**20, host]
    every = ctx.all_reduce([v if r == ctx.rank else 0.0 for r in range(world) for v in mine]).tolist()
    peaks, load_peaks, layer_mib, hosts = (every[i::4] for i in range(4))
    plan = strategy if strategy in ("none", "ddp", "fsdp") else ("fsdp" if world > 1 else "none")
    kw = dict(world_size=world, strategy=plan, cpu_offload=args.cpu_offload, gradient_checkpointing=not args.tiny)
    est = estimate(model_shape(arch), args.seq_len, args.batch, **kw).total / 2**30
    return dict(layers=arch.num_hidden_layers, strategy=strategy, tok_s=tok_s, peaks=peaks if peak else None,
                built_s=built, estimate=est, load_peaks=load_peaks, layer_mib=layer_mib, streamed=streamed,
                load_host=hosts)  # fmt: skip


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers to build (default: all)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--strategy", default="auto", choices=("auto", "fsdp", "ddp", "none"))
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP CPU offload of shards and optimizer state")
    ap.add_argument(
        "--load",
        default="streamed",
        choices=("streamed", "whole"),
        help="fsdp: shard each layer as it is built (as kbit train loads) or build whole, then shard",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, a toy shape (hidden 64): checks the script")
    ap.add_argument("--fp32", action="store_true", help="with --tiny: compute in fp32 instead of bf16")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo (implied by --tiny)")
    ap.add_argument("--load-only", action="store_true", help="build (and shard) the model, report the load, no steps")
    ap.add_argument("--model", default=None, help="a model folder to load (as kbit train does) instead of --preset")
    args = ap.parse_args()
    if args.tiny:
        shape = TINY
        args.seq_len, args.batch, args.steps = min(args.seq_len, 32), min(args.batch, 2), min(args.steps, 3)
        args.layers = args.layers or [1, 2]
    else:
        shape = PRESETS[args.preset]
    ctx = init_distributed("cpu" if args.tiny else args.device)
    name = "tiny" if args.tiny else args.model or args.preset
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    rows = [measure(args, ctx, layers, shape) for layers in (args.layers or [None])]
    if ctx.is_main:
        cuda = ctx.device.type == "cuda"
        memory = "peak GiB per GPU" if cuda else "peak RSS GiB per rank"
        loading = "load peak GiB per GPU" if cuda else "load peak GiB of model tensors per rank"
        print(f"\n{name}, {ctx.world_size} x {device}, {args.batch} x {args.seq_len} per GPU, {args.steps} steps")
        print(
            f"| layers | strategy | load | {loading} | load peak host GiB | MiB per layer per rank | "
            f"tokens/s (all GPUs) | tokens/s per GPU | {memory} | estimate GiB | build+shard s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")

        def per_rank(values: list[float], fmt: str) -> str:
            return " / ".join(format(v, fmt) for v in values)

        for r in rows:
            how = "streamed" if r["streamed"] else "whole"
            per_layer = per_rank(r["layer_mib"], ".1f") if r["streamed"] else "-"
            speed = "- | -" if r["tok_s"] is None else f"{r['tok_s']:,.0f} | {r['tok_s'] / ctx.world_size:,.0f}"
            print(
                f"| {r['layers']} | {r['strategy']} | {how} | {per_rank(r['load_peaks'], '.3f')} | "
                f"{per_rank(r['load_host'], '.2f')} | {per_layer} | "
                f"{speed} | {per_rank(r['peaks'], '.2f') if r['peaks'] else '-'} | {r['estimate']:.2f} | "
                f"{r['built_s']:.0f} |"
            )
        if len(rows) >= 2 and not args.load_only:
            full = shape["num_hidden_layers"]
            xs = [float(r["layers"]) for r in rows]
            a, b = fit(xs, [max(r["peaks"]) for r in rows])
            # seconds per step are what add up per layer; tokens/s is their inverse
            tokens = args.batch * args.seq_len * ctx.world_size
            c, d = fit(xs, [tokens / r["tok_s"] for r in rows])
            print(
                f"extrapolated to {full} layers (fit over {', '.join(str(int(x)) for x in xs)} measured): "
                f"peak {a + b * full:.2f} GiB per GPU ({b:.3f} GiB per layer + {a:.2f}), "
                f"{tokens / (c + d * full):,.0f} tokens/s ({d * 1000:.1f} ms per layer per step)"
            )
    close_distributed()


if __name__ == "__main__":
    main()
