"""Tokens/s and per-GPU peak memory of kbit QLoRA training on 1 and 2 GPUs (FSDP2 or DDP), launched with torchrun.

    torchrun --nproc-per-node 1 bench/fsdp_step.py --preset llama-3-8b --batch 4 --seq-len 2048
    torchrun --nproc-per-node 2 bench/fsdp_step.py --preset llama-3-8b --batch 4 --seq-len 2048 --strategy fsdp
    torchrun --nproc-per-node 2 bench/fsdp_step.py --preset llama-2-70b --layers 2 4 --batch 1 --seq-len 2048
    torchrun --nproc-per-node 2 bench/fsdp_step.py --tiny          # CPU + gloo, a toy shape: checks the script

Each rank builds the same random model (seeded) of the preset's shape on its own device, with ``--layers`` decoder
layers when given (else the preset's count): NF4 + double quant linears packed as bf16 (``quant_storage`` = the
compute dtype, what FSDP shards), LoRA r=16 alpha 32 on all seven projections (fp32 masters), then runs
``--steps`` optimizer steps of kbit's Trainer (bf16 autocast, non-reentrant gradient checkpointing, torch AdamW,
``per_device_train_batch_size`` = ``--batch`` full-length sequences per GPU, every token a target). It prints the
median global tokens/s over the steps after the first and each rank's peak memory (``max_memory_allocated``
after the model was built and sharded; RSS on the CPU). With two or more ``--layers`` values it also fits
memory = a + b x layers and time = c + d x layers and extrapolates them to the preset's full depth: state which
numbers were measured and which extrapolated when quoting them.
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

from kbit.data import Example  # noqa: E402
from kbit.dist import DistContext, close_distributed, init_distributed, match_quant_storage  # noqa: E402
from kbit.estimate import PRESETS  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)  # fmt: skip


def build_model(shape: dict, layers: int | None, ctx: DistContext, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random Llama-like model of ``shape`` with 4-bit linears (packed as ``dtype``), built on this rank's device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbit.nn import Linear4bit
    from kbit.quant import quantize_4bit

    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)  # the same weights on every rank
    head = model.get_output_embeddings()
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and mod is not head:  # one layer at a time: never a dense model in memory
            w = torch.randn(mod.out_features, mod.in_features, device=ctx.device, dtype=dtype, generator=gen) * 0.02
            packed, state = quantize_4bit(w, "nf4", 64, True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_quantized(packed, state, compute_dtype=dtype))
    for mod in model.modules():  # embeddings, norms, the head
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = torch.randn(p.shape, device=ctx.device, dtype=dtype, generator=gen) * 0.02
                mod._parameters[pname] = nn.Parameter(torch.ones_like(t) if p.dim() == 1 else t, requires_grad=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.device(ctx.device):  # the rotary tables were computed on meta: build them again for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    match_quant_storage(model, dtype)  # FSDP gathers one dtype per unit
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure(args, ctx: DistContext, layers: int | None, shape: dict) -> dict:
    """One model of ``layers`` layers: (median global tokens/s, step seconds, peak GiB of each rank)."""
    from kbit.lora import add_lora
    from kbit.train import Trainer

    dtype = torch.float32 if args.tiny and args.fp32 else torch.bfloat16
    t0 = time.perf_counter()
    model = build_model(shape, layers, ctx, dtype)
    torch.manual_seed(0)
    add_lora(model, r=16, alpha=32, dropout=0.0, dtype=torch.float32)
    world = ctx.world_size
    gen = torch.Generator().manual_seed(1)
    n = args.batch * world * args.steps
    tokens = torch.randint(1, shape["vocab_size"], (n, args.seq_len), generator=gen).tolist()
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
    peaks = ctx.all_reduce([peak if r == ctx.rank else 0.0 for r in range(world)]).tolist()
    tok_s = statistics.median(times[1:] or times)
    layers_run = layers if layers is not None else shape["num_hidden_layers"]
    del trainer, model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(layers=layers_run, strategy=strategy, tok_s=tok_s, peaks=peaks, built_s=built)


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
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, a toy shape (hidden 64): checks the script")
    ap.add_argument("--fp32", action="store_true", help="with --tiny: compute in fp32 instead of bf16")
    args = ap.parse_args()
    if args.tiny:
        shape = TINY
        args.seq_len, args.batch, args.steps = min(args.seq_len, 32), min(args.batch, 2), min(args.steps, 3)
        args.layers = args.layers or [1, 2]
    else:
        shape = PRESETS[args.preset]
    ctx = init_distributed("cpu" if args.tiny else "cuda")
    name = "tiny" if args.tiny else args.preset
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    rows = [measure(args, ctx, layers, shape) for layers in (args.layers or [None])]
    if ctx.is_main:
        memory = "peak GiB per GPU" if ctx.device.type == "cuda" else "peak RSS GiB per rank"
        print(f"\n{name}, {ctx.world_size} x {device}, {args.batch} x {args.seq_len} per GPU, {args.steps} steps")
        print(f"| layers | strategy | tokens/s (all GPUs) | tokens/s per GPU | {memory} | build+shard s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            peaks = " / ".join(f"{p:.2f}" for p in r["peaks"])
            print(
                f"| {r['layers']} | {r['strategy']} | {r['tok_s']:,.0f} | {r['tok_s'] / ctx.world_size:,.0f} | "
                f"{peaks} | {r['built_s']:.0f} |"
            )
        if len(rows) >= 2:
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
