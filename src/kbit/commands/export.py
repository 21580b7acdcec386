"""``kbit merge`` and ``kbit quantize``: write a merged or a 4-bit Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from .common import DTYPES, dtype_of


def add_parser(sub) -> None:
    """Register merge and quantize."""
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and write a Hugging Face folder")
    m.add_argument("--model", default="default", help="the base the adapter was trained on")
    m.add_argument("--adapter", required=True, type=Path, help="adapter folder (PEFT format)")
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument(
        "--bits",
        type=int,
        default=16,
        choices=(16, 4),
        help="16: dense weights in --dtype (default); 4: requantize to the base's 4-bit format",
    )
    m.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    m.add_argument(
        "--base-bits",
        "--base_bits",
        dest="base_bits",
        type=int,
        default=4,
        choices=(4, 8, 16),
        help="how the base was loaded for training (default 4)",
    )
    m.add_argument("--quant-type", "--quant_type", dest="quant_type", default="nf4", choices=("nf4", "fp4"))
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--no-report", dest="report", action="store_false", help="skip the fidelity measurement")
    m.add_argument("--device", default=None)
    m.set_defaults(func=_merge)
    q = sub.add_parser("quantize", help="save a 4-bit checkpoint that transformers + bitsandbytes load")
    q.add_argument("--model", default="default")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--quant-type", "--quant_type", dest="quant_type", default="nf4", choices=("nf4", "fp4"))
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="compute dtype recorded in the config")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--device", default=None)
    q.set_defaults(func=_quantize)
    g = sub.add_parser("gguf", help="export a (merged) 16-bit Hugging Face folder to GGUF for llama.cpp-based tools")
    g.add_argument("--model", required=True, type=Path, help="a Hugging Face folder, e.g. the output of kbit merge")
    g.add_argument("--out", required=True, type=Path, help="the .gguf file to write (outside the model folder)")
    g.add_argument("--type", dest="out_type", default="q8_0", choices=("f16", "bf16", "q8_0"))
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=_gguf)


def _merge(args) -> int:
    from ..export import merge

    rep = merge(args.model, args.adapter, args.out, dtype=dtype_of(args.dtype), bits=args.bits,
                overwrite=args.overwrite, base_bits=args.base_bits, quant_type=args.quant_type, report=args.report,
                device=args.device)  # fmt: skip
    print(f"wrote {args.out}")
    if rep is not None:
        print(rep.line())
    return 0


def _quantize(args) -> int:
    from ..export import quantize_model

    out = quantize_model(args.model, args.out, quant_type=args.quant_type, double_quant=args.double_quant,
                         blocksize=args.blocksize, compute_dtype=dtype_of(args.dtype), overwrite=args.overwrite,
                         device=args.device)  # fmt: skip
    print(f"wrote {out} (transformers + bitsandbytes load it with from_pretrained; kbit with load_model)")
    return 0


def _gguf(args) -> int:
    from ..export import export_gguf

    out = export_gguf(args.model, args.out, out_type=args.out_type, overwrite=args.overwrite)
    print(f"wrote {out} ({args.out_type})")
    return 0
