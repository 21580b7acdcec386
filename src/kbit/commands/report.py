"""``kbit quantize-report``: size in memory and reconstruction error of a model's linear layers, per format."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub) -> None:
    """Register quantize-report."""
    q = sub.add_parser("quantize-report", help="quantize a model's linear layers and report size and error per format")
    q.add_argument("--model", default="default", help="model to quantize (default: the embedded SmolLM2-135M)")
    q.add_argument("--formats", default="nf4,nf4-dq,fp4,fp4-dq,int8", help="comma-separated formats to compare")
    q.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (default 64)")
    q.set_defaults(func=_quantize_report)


def _quantize_report(args: argparse.Namespace) -> int:
    import torch

    from ..eval.quant_error import linear_weights, report
    from ..models.default import default_model_path

    if args.model != "default":
        print(
            f"error: --model {args.model!r}: only 'default' is supported by quantize-report so far",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = default_model_path()
    print(f"loading {path.name} (SmolLM2-135M-Instruct) ...", flush=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    weights = linear_weights(model)
    n_params = sum(w.numel() for w in weights.values())
    others = sum(p.numel() for p in model.parameters()) - n_params  # embeddings (tied lm_head), norms
    print(
        f"loaded in {time.perf_counter() - t0:.1f} s: {len(weights)} linear layers, {n_params / 1e6:.1f}M "
        f"parameters in them, {others / 1e6:.1f}M elsewhere (kept in bf16)\n"
    )
    bf16 = 2 * n_params
    print(
        "| format | blocksize | linear weights in memory | vs bf16 | bits/param | rel. RMS error "
        "| worst layer (error) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| bf16 | - | {bf16 / 2**20:.1f} MiB | 1.00x | 16.00 | 0 | - |")
    for fmt in args.formats.split(","):
        r = report(weights, fmt, args.blocksize)
        print(
            f"| {fmt} | {args.blocksize if fmt != 'int8' else 'row'} | {r.weight_bytes / 2**20:.1f} MiB | "
            f"{bf16 / r.weight_bytes:.2f}x | {8 * r.weight_bytes / n_params:.2f} | {r.rel_rms_error:.4f} | "
            f"{r.worst_layer} ({r.worst_error:.4f}) |",
            flush=True,
        )
    total = 2 * others + report(weights, "nf4-dq", args.blocksize).weight_bytes
    print(
        f"\nwhole model with NF4 + double quant linears: {total / 2**20:.1f} MiB "
        f"(bf16: {2 * (n_params + others) / 2**20:.1f} MiB)"
    )
    return 0
