"""Zero-shot perplexity of the embedded SmolLM2-135M-Instruct in bf16 and quantized by kbit and by bitsandbytes.

    python bench/quality.py            # 6,144 tokens; every row, kbit and bnb models both scored (~10 min, 2-core CPU)
    python bench/quality.py --quick    # 1,024 tokens; bf16, NF4, NF4+DQ, FP4+DQ at blocksize 64; kbit only
    python bench/quality.py --dtype bf16   # score in bf16 instead of float32

The text is ``kbit.eval.reference_text`` (docstrings of standard-library modules: English nobody in this project wrote,
the same on every machine with the same Python minor version), tokenized, cut to the first ``--tokens`` tokens and
scored in independent 512-token windows (``kbit.eval.perplexity``).

Every row starts from the same bf16 weights (``load_model("default", bits=16)``, which is what ``load_model(bits=4|8)``
quantizes). For each linear but the tied output head: kbit quantizes with ``Linear4bit.from_linear`` /
``Linear8bit.from_linear``; bitsandbytes with ``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant``,
and the script checks that both produced the same bytes and statistics. Each side then dequantizes with its own code
and the scored model is the dense model holding those dequantized weights, in ``--dtype`` (float32 by default: the
exact value of every 4-bit code times its scale, so the number is "the perplexity of these weights"; bf16 rounds the
dequantized weights and the activations, which is what a kbit layer with ``compute_dtype=bf16`` computes). A kbit
layer computes ``F.linear(x, dequantize(W), b)`` itself, so materializing the dequantized weights once changes no value
and spares a dequantization per window.

LoftQ rows (``kbit.lora.loftq``): the 4-bit weight is NF4 + DQ (blocksize 64) of ``W - L R`` and the scored weight is
``dequant(Q) + L R``, the effective weight a LoftQ-initialised LoRA of rank r starts from. bitsandbytes quantizes the
same ``W - L R`` and its model gets the same ``L R`` added.

int8: both sides multiply by the dequantized row-wise weight (kbit's Linear8bit computes so); bitsandbytes' int8
*matmul* would also quantize the activations, a different computation, not compared here.
"""

from __future__ import annotations

import os

# bitsandbytes' CPU path wraps itself in torch.compile; compiling costs minutes here and changes no value.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kbit.eval import perplexity, reference_text  # noqa: E402
from kbit.lora.loftq import loftq_decompose  # noqa: E402
from kbit.models import load_model, load_tokenizer  # noqa: E402
from kbit.nn import Linear4bit, Linear8bit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    """One quantization of the linear weights; bits=16 is the unquantized bf16 model; loftq_r > 0 adds LoftQ."""

    label: str
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int | None = None  # None: not blockwise (bf16, int8 row-wise)
    loftq_r: int = 0


def configs(quick: bool, loftq_ranks: tuple[int, ...] = (16, 64)) -> list[Config]:
    """The rows of the table, in order."""
    rows = [Config("bf16", 16)]
    for bs in (64,) if quick else (64, 128):
        rows += [Config("NF4", 4, "nf4", False, bs), Config("NF4 + DQ", 4, "nf4", True, bs)]
        if not quick:
            rows.append(Config("FP4", 4, "fp4", False, bs))
        rows.append(Config("FP4 + DQ", 4, "fp4", True, bs))
    if not quick:
        rows.append(Config("int8 (row-wise)", 8))
        rows += [Config(f"LoftQ r={r} (NF4 + DQ)", 4, "nf4", True, 64, r) for r in loftq_ranks]
    return rows


def linear_names(model) -> list[str]:
    """The linears ``load_model`` quantizes: every ``nn.Linear`` but the output embedding (tied to the input one)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def kbit_weights(w: torch.Tensor, cfg: Config, dtype: torch.dtype):
    """kbit's quantization of bf16 weight ``w`` [out, in] for row ``cfg``.

    Returns (scored weight in ``dtype``, the kbit layer, the matrix it quantized, the LoftQ low-rank part L R or None).
    """
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    low = None
    lin.weight.data = w
    if cfg.loftq_r:
        # alpha = 2r as in the default job; the effective weight dequant(Q) + s·B A does not depend on s.
        res = loftq_decompose(w, cfg.loftq_r, 2.0, cfg.quant_type, cfg.blocksize, cfg.double_quant, iters=5)
        low = 2.0 * res.lora_B @ res.lora_A  # = L R, float32
        lin.weight.data = res.quantized_from
    if cfg.bits == 8:
        layer = Linear8bit.from_linear(lin, compute_dtype=dtype)
    else:
        layer = Linear4bit.from_linear(lin, dtype, cfg.quant_type, cfg.double_quant, torch.uint8, cfg.blocksize)
    # Dequantized in the scoring dtype, as the layer's own forward does; LoftQ adds L R to the float32 weight.
    deq = layer.dequantize(dtype) if low is None else (layer.dequantize(torch.float32) + low).to(dtype)
    return deq, layer, lin.weight.data, low


def bnb_weights(target: torch.Tensor, cfg: Config, dtype: torch.dtype, layer: nn.Module, low: torch.Tensor | None):
    """bitsandbytes' side of one weight: (its dequantization of ``target`` in ``dtype`` (+ ``low``), bytes and
    dequantized values equal kbit's, bnb's dequantize called with the weight's [out, in] shape equals kbit's).

    The scored weight comes from bnb's ``dequantize_4bit`` given the flat shape [out * in]: bnb 0.50.2's native CPU
    kernel, given [out, in], starts a new block at every row, which is wrong (the format's blocks run across rows)
    whenever ``in % blocksize != 0`` (here: 576 % 128). The flat call gives bnb's own format semantics, equal to its
    pure-PyTorch reference; the third value reports whether the shaped call (what bnb's Linear4bit does) agrees.
    """
    import bitsandbytes.functional as bnbf

    if cfg.bits == 8:
        cb, scb, _ = bnbf.int8_vectorwise_quant(target)
        same = torch.equal(layer.weight, cb) and torch.equal(layer.SCB, scb)
        deq = bnbf.int8_vectorwise_dequant(cb, scb)
        return deq.to(dtype), same and torch.equal(deq, layer.dequantize(torch.float32)), True
    packed, state = bnbf.quantize_4bit(target, blocksize=cfg.blocksize, compress_statistics=cfg.double_quant,
                                       quant_type=cfg.quant_type)  # fmt: skip
    shaped_ok = torch.equal(bnbf.dequantize_4bit(packed, state), layer.dequantize(target.dtype))
    flat = copy.copy(state)
    flat.shape, flat.dtype = torch.Size([target.numel()]), torch.float32  # float32: codes times scales, unrounded
    deq = bnbf.dequantize_4bit(packed, flat).reshape(target.shape)
    same = torch.equal(layer.weight.view(torch.uint8).flatten(), packed.view(torch.uint8).flatten())
    same = same and torch.equal(deq, layer.dequantize(torch.float32))
    deq = deq.to(dtype) if low is None else (deq + low).to(dtype)
    return deq, same, shaped_ok


def set_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (by linear name) into ``model``'s linears."""
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)


def main() -> None:
    """Print the perplexity table (markdown) and the targets."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, blocksize 64, kbit only (CI-sized)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens of reference text (default 6144; quick 1024)")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the scored dense models (default fp32)")
    ap.add_argument("--loftq-ranks", default="16,64", help="LoftQ ranks to score (comma-separated; '' for none)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    n_tokens = args.tokens or (1024 if args.quick else 6144)
    ranks = tuple(int(r) for r in args.loftq_ranks.split(",") if r.strip())
    t0 = time.time()
    tok = load_tokenizer("default")
    ids = tok(reference_text(max_chars=8 * n_tokens), return_tensors="pt").input_ids[0, :n_tokens]
    if ids.numel() < n_tokens:
        raise SystemExit(f"the reference text gave only {ids.numel()} tokens; ask for fewer with --tokens")
    base = load_model("default", bits=16, device="cpu")  # bf16 weights, as load_model casts before quantizing
    names = linear_names(base)
    bf16_w = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    model = base.to(dtype)  # the scored model: its linears get each row's dequantized weights

    # config -> (kbit ppl, bnb ppl, bnb bytes and weights = kbit's, bnb's shaped CPU dequantize = kbit's)
    rows: dict[Config, tuple[float, float | None, bool | None, bool | None]] = {}
    for cfg in configs(args.quick, ranks):
        t = time.time()
        if cfg.bits == 16:
            set_weights(model, bf16_w)
            rows[cfg] = (perplexity(model, ids), None, None, None)
        else:
            k_w, b_w, same, shaped = {}, {}, True, True
            for n in names:
                k_w[n], layer, target, low = kbit_weights(bf16_w[n], cfg, dtype)
                if not args.quick:
                    b_w[n], ok, shaped_ok = bnb_weights(target, cfg, dtype, layer, low)
                    same, shaped = same and ok, shaped and shaped_ok
            t_q = time.time() - t
            set_weights(model, k_w)
            k_ppl = perplexity(model, ids)
            b_ppl = None
            if not args.quick:
                set_weights(model, b_w)
                b_ppl = perplexity(model, ids)
            rows[cfg] = (k_ppl, b_ppl, *((None, None) if args.quick else (same, shaped)))
            del k_w, b_w
            print(f"  quantized in {t_q:.0f} s", file=sys.stderr, end="")
        print(f"  {cfg.label} bs={cfg.blocksize}: {rows[cfg]} "
              f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    report(rows, ids.numel(), args, time.time() - t0)


def report(rows: dict[Config, tuple], n_tokens: int, args, seconds: float) -> None:
    """Print the markdown table and the targets."""
    bf16 = rows[Config("bf16", 16)][0]
    print(f"\nPerplexity on the first {n_tokens} tokens of kbit.eval.reference_text (Python "
          f"{platform.python_version()}), 512-token windows, scored in {args.dtype}; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {seconds:.0f} s in all\n")  # fmt: skip
    print("| config | blocksize | kbit ppl | bnb ppl | vs bf16 | bnb bytes, weights = kbit's | bnb CPU shaped ok |")
    print("|---|---|---|---|---|---|---|")

    def yes(x: bool | None) -> str:
        return "-" if x is None else ("yes" if x else "NO")

    for cfg, (k, b, same, shaped) in rows.items():
        bs = cfg.blocksize or ("row" if cfg.bits == 8 else "-")
        b_s = "-" if b is None else f"{b:.4f}"
        print(f"| {cfg.label} | {bs} | {k:.4f} | {b_s} | {k / bf16 - 1:+.2%} | {yes(same)} | {yes(shaped)} |")

    print("\nTargets:")
    for bs in (64,) if args.quick else (64, 128):
        nf4 = rows[Config("NF4 + DQ", 4, "nf4", True, bs)][0]
        nf4_plain = rows[Config("NF4", 4, "nf4", False, bs)][0]
        fp4 = rows[Config("FP4 + DQ", 4, "fp4", True, bs)][0]
        met = "met" if nf4 < fp4 else "MISSED"
        print(f"- blocksize {bs}: NF4+DQ increase {nf4 / bf16 - 1:+.2%} < FP4+DQ increase {fp4 / bf16 - 1:+.2%}: {met}")
        dq = nf4 / nf4_plain - 1
        met = "met" if abs(dq) < 1e-3 else f"MISSED by {abs(dq) - 1e-3:.3%}"
        print(f"- blocksize {bs}: double quant changes NF4 perplexity by {dq:+.3%} (target |change| < 0.1%): {met}")
    nf4 = rows[Config("NF4 + DQ", 4, "nf4", True, 64)][0]
    for cfg, (k, *_) in rows.items():
        if cfg.loftq_r:
            half = (nf4 / bf16 - 1) / 2
            met = "met" if k / bf16 - 1 <= half else f"MISSED by {k / bf16 - 1 - half:.2%} points"
            print(f"- {cfg.label}: increase {k / bf16 - 1:+.2%}, half of NF4+DQ's is {half:+.2%}: {met}")
    if not args.quick:
        agree = all(b == k for k, b, *_ in rows.values() if b is not None)
        same = all(s for _, _, s, _ in rows.values() if s is not None)
        print(f"- kbit and bitsandbytes perplexities identical in every row: {'yes' if agree else 'NO'}")
        print(f"- bnb's quantized bytes and dequantized weights equal kbit's in every row: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
