"""Options shared by the model-loading subcommands."""

from __future__ import annotations

import argparse

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_model_options(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """--model, --adapter, --bits, --quant-type, --device."""
    p.add_argument(
        "--model",
        default="default",
        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a folder, a .gguf file or a Hub id",
    )
    if adapter:
        p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format) to apply unmerged")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8, 16), help="how to load the base (default 4)")
    p.add_argument("--quant-type", "--quant_type", dest="quant_type", default="nf4", choices=("nf4", "fp4"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")


def dtype_of(name: str):
    """torch dtype for bf16 / fp16 / fp32."""
    import torch

    return getattr(torch, DTYPES[name])


def load_for_inference(args: argparse.Namespace):
    """(model, tokenizer) from the model options, with the adapter attached unmerged."""
    from ..export import load_adapter
    from ..models import load_model, load_tokenizer

    model = load_model(args.model, bits=args.bits, quant_type=args.quant_type, device=args.device)
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter, dtype=model.kbit_load_config.compute_dtype)
    model.eval()
    return model, load_tokenizer(args.model)
