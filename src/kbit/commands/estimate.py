"""``kbit estimate``: GPU memory of a QLoRA fine-tune, by part, and the largest batch that fits."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register estimate."""
    from ..estimate import OPTIMIZER_BYTES, PRESETS

    e = sub.add_parser("estimate", help="estimate GPU memory (weights/adapters/optimizer/activations) and max batch")
    e.add_argument(
        "--model",
        default="default",
        help=f"'default', a folder, a .gguf, a Hub id, or a preset: {', '.join(PRESETS)}",
    )
    e.add_argument("--max-seq-len", "--max_seq_len", "--seq-len", dest="seq_len", type=int, default=2048)
    e.add_argument(
        "--per-device-train-batch-size",
        "--per_device_train_batch_size",
        "--batch",
        dest="batch",
        type=int,
        default=1,
    )
    e.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=16)
    e.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    e.add_argument("--optim", default="adamw", choices=sorted(OPTIMIZER_BYTES))
    e.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    e.add_argument(
        "--gpu-memory",
        "--gpu_memory",
        dest="gpu_memory",
        type=float,
        default=24.0,
        help="GiB available, for the largest batch (default 24)",
    )
    e.set_defaults(func=_estimate)


def _estimate(args) -> int:
    from ..estimate import estimate, largest_batch, load_config, model_shape

    shape = model_shape(load_config(args.model))
    kw = dict(
        lora_r=args.lora_r,
        bits=args.bits,
        optim=args.optim,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    est = estimate(shape, args.seq_len, args.batch, **kw)
    print(
        f"{args.model}: batch {args.batch} x {args.seq_len} tokens, {args.bits}-bit base, LoRA r={args.lora_r}, "
        f"{args.optim}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n"
    )
    print(est.table())
    best = largest_batch(shape, args.gpu_memory * 2**30, args.seq_len, **kw)
    print(f"\nlargest batch of {args.seq_len}-token sequences that fits {args.gpu_memory:g} GiB: {best}")
    return 0
