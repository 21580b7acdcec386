"""``kbit estimate``: GPU memory of a QLoRA fine-tune, by part, the largest batch that fits (per GPU of N), and with
``--longest`` the longest single sequence that trains in given GPU and host memory."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register estimate."""
    from ..estimate import OPTIMIZER_BYTES, PRESETS, STRATEGIES

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
    e.add_argument("--gpus", type=int, default=1, help="GPUs the run is spread over (torchrun --nproc-per-node)")
    e.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="none (one GPU), ddp (a whole model per GPU) or fsdp (sharded); default: none for 1 GPU, else fsdp",
    )
    e.add_argument("--cpu-offload", "--cpu_offload", dest="cpu_offload", action="store_true",
                   help="fsdp: shards, gradients and optimizer state in pinned host memory")  # fmt: skip
    e.add_argument("--activation-offload", dest="activation_offload", action="store_true",
                   help="checkpointed layer inputs in host memory (kbit train: memory_plan memory)")  # fmt: skip
    e.add_argument(
        "--gpu-memory",
        "--gpu_memory",
        dest="gpu_memory",
        type=float,
        default=24.0,
        help="GiB available, for the largest batch (default 24)",
    )
    e.add_argument("--longest", action="store_true",
                   help="also the longest single sequence kbit train fits (fast path, memory_plan speed; layer inputs "
                        "offloaded to pinned host memory as needed), and its plan at --max-seq-len")  # fmt: skip
    e.add_argument("--host-memory", "--host_memory", dest="host_memory", type=float, default=None,
                   help="GiB of host memory for --longest (default: not limited)")  # fmt: skip
    e.set_defaults(func=_estimate)


def _estimate(args) -> int:
    import sys

    from ..estimate import check_plan, estimate, largest_batch, load_config, model_shape

    strategy = args.strategy or ("none" if args.gpus == 1 else "fsdp")
    kw = dict(
        lora_r=args.lora_r,
        bits=args.bits,
        optim=args.optim,
        gradient_checkpointing=args.gradient_checkpointing,
        world_size=args.gpus,
        strategy=strategy,
        cpu_offload=args.cpu_offload,
        activation_offload=args.activation_offload,
    )
    try:
        check_plan(**{k: v for k, v in kw.items() if k != "lora_r"})
    except ValueError as e:
        print(f"kbit estimate: error: {e}", file=sys.stderr)
        return 2
    shape = model_shape(load_config(args.model))
    est = estimate(shape, args.seq_len, args.batch, **kw)
    where = "on one GPU" if args.gpus == 1 else f"per GPU of {args.gpus}"
    if strategy != "none":
        where += f" ({strategy}{', cpu offload' if args.cpu_offload else ''})"
    print(
        f"{args.model}: batch {args.batch} x {args.seq_len} tokens{' per GPU' if args.gpus > 1 else ''}, "
        f"{args.bits}-bit base, LoRA r={args.lora_r}, {args.optim}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, activation offload "
        f"{'on' if args.activation_offload else 'off'}; memory {where}\n"
    )
    print(est.table())
    if args.gradient_checkpointing:  # the other side of the activation-offload question, in one line
        other = estimate(shape, args.seq_len, args.batch, **(kw | {"activation_offload": not args.activation_offload}))
        print(
            f"\n{'without' if args.activation_offload else 'with'} activation offload"
            f"{'' if args.activation_offload else ' (memory_plan: memory)'}: "
            f"{other.total / 2**30:.2f} GiB"
        )
    best = largest_batch(shape, args.gpu_memory * 2**30, args.seq_len, **kw)
    print(f"\nlargest batch of {args.seq_len}-token sequences that fits {args.gpu_memory:g} GiB {where}: {best}")
    if args.longest:
        _longest(args, shape)
    return 0


def _longest(args, shape) -> None:
    from ..estimate import long_context, longest_seq_len

    gpu = args.gpu_memory * 2**30
    host = float("inf") if args.host_memory is None else args.host_memory * 2**30
    memories = f"{args.gpu_memory:g} GiB of GPU memory" + (
        "" if args.host_memory is None else f" and {args.host_memory:g} GiB of host memory"
    )
    kw = dict(lora_r=args.lora_r, optim=args.optim)
    best = longest_seq_len(shape, gpu, host, **kw)
    print(f"\nlongest sequence at batch 1 that kbit train fits in {memories} (fast path, memory_plan speed):")
    if best is None:
        print("  none: not even one token")
        return
    bound = "GPU memory"
    if args.host_memory is not None:
        gpu_only = longest_seq_len(shape, gpu, float("inf"), **kw)
        bound = "host memory (pinned layer inputs)" if gpu_only.seq_len > best.seq_len else bound
        bound += f"; GPU memory alone: {gpu_only.seq_len:,} tokens" if gpu_only.seq_len > best.seq_len else ""
    print(f"  {best.seq_len:,} tokens: {best.describe()} (bound by {bound})")
    at = long_context(shape, args.seq_len, gpu, host, **kw)
    verdict = "fits" if at.fits else "does not fit " + ("the GPU" if not at.fits_gpu else "the host memory")
    print(f"  at {args.seq_len:,} tokens: {at.describe()}: {verdict}")
