"""Zero-shot perplexity of the embedded SmolLM2-135M-Instruct in bf16 and quantized by kbit and by bitsandbytes.

    python bench/quality.py            # 6,144 tokens; NF4, NF4+DQ, FP4+DQ at blocksize 64 and 128, int8; kbit and bnb
    python bench/quality.py --quick    # 1,024 tokens; bf16, NF4, NF4+DQ, FP4+DQ at blocksize 64; kbit only
    python bench/quality.py --tokens 1024 --bnb-spot   # what docs/quality.md reports (2-core CPU: ~16 minutes)

The text is ``kbit.eval.reference_text`` (docstrings of standard-library modules: English nobody in this project wrote,
the same on every machine with the same Python minor version), tokenized, cut to the first ``--tokens`` tokens and
scored in independent 512-token windows (``kbit.eval.perplexity``).

The model is loaded once in bf16. Each kbit row swaps every linear but the (tied) output head for a
``Linear4bit.from_linear`` / ``Linear8bit.from_linear`` built from those bf16 weights, which is what
``load_model(bits=4|8)`` does, without re-reading the GGUF per configuration. Each bitsandbytes row quantizes the same
bf16 weights with ``bitsandbytes.functional.quantize_4bit`` (or ``int8_vectorwise_quant``), dequantizes them with
bitsandbytes and puts the result into a plain bf16 ``nn.Linear``. For 4-bit the packed bytes are compared with kbit's
too: the formats are bit-exact, so the two perplexities must be equal. For int8 both sides multiply by the dequantized
weight (kbit's Linear8bit computes so; bitsandbytes' int8 *matmul* would also quantize the activations, which is a
different computation, not compared here).
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
from kbit.models import load_model, load_tokenizer  # noqa: E402
from kbit.nn import Linear4bit, Linear8bit  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One quantization of the linear weights; bits=16 is the unquantized bf16 model."""

    label: str
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int | None = None  # None: not blockwise (bf16, int8 row-wise)


def configs(quick: bool) -> list[Config]:
    """The rows of the table, in order."""
    rows = [Config("bf16", 16)]
    for bs in (64,) if quick else (64, 128):
        rows += [Config("NF4", 4, "nf4", False, bs), Config("NF4 + DQ", 4, "nf4", True, bs),
                 Config("FP4 + DQ", 4, "fp4", True, bs)]  # fmt: skip
    if not quick:
        rows.append(Config("int8 (row-wise)", 8))
    return rows


def linear_names(model) -> list[str]:
    """The linears ``load_model`` quantizes: every ``nn.Linear`` but the output embedding (tied to the input one)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def _swap(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def kbit_model(base, cfg: Config):
    """A copy of ``base`` whose linears are kbit Linear4bit / Linear8bit quantized from its bf16 weights."""
    model = copy.deepcopy(base)
    for name in linear_names(model):
        lin = model.get_submodule(name)
        if cfg.bits == 8:
            new = Linear8bit.from_linear(lin, compute_dtype=torch.bfloat16)
        else:
            new = Linear4bit.from_linear(lin, torch.bfloat16, cfg.quant_type, cfg.double_quant, torch.uint8,
                                         cfg.blocksize)  # fmt: skip
        _swap(model, name, new)
    return model


def bnb_model(base, cfg: Config, kbit=None) -> tuple[nn.Module, bool | None]:
    """A copy of ``base`` whose linear weights are bitsandbytes' quantize-then-dequantize of its bf16 weights.

    Also returns whether bnb's packed bytes and statistics equal ``kbit``'s layer by layer (None when not compared).
    """
    import bitsandbytes.functional as bnbf

    model = copy.deepcopy(base)
    same = True if kbit is not None else None
    for name in linear_names(model):
        lin = model.get_submodule(name)
        w = lin.weight.detach()
        if cfg.bits == 8:
            cb, scb, _ = bnbf.int8_vectorwise_quant(w)
            deq = bnbf.int8_vectorwise_dequant(cb, scb)
            if kbit is not None:
                k = kbit.get_submodule(name)
                same = same and torch.equal(k.weight, cb) and torch.equal(k.SCB, scb)
        else:
            packed, state = bnbf.quantize_4bit(w, blocksize=cfg.blocksize, compress_statistics=cfg.double_quant,
                                               quant_type=cfg.quant_type)  # fmt: skip
            deq = bnbf.dequantize_4bit(packed, state)
            if kbit is not None:
                k = kbit.get_submodule(name)
                same = same and torch.equal(k.weight.view(torch.uint8).flatten(), packed.view(torch.uint8).flatten())
                same = same and torch.equal(k.dequantize(torch.bfloat16), deq.to(torch.bfloat16))
        lin.weight.data = deq.to(torch.bfloat16)
    return model, same


def main() -> None:
    """Print the perplexity table (markdown) and the two targets."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,024 tokens, blocksize 64, kbit only (CI-sized)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens of reference text (default 6144; quick 1024)")
    ap.add_argument("--bnb-spot", action="store_true",
                    help="compare bnb's bytes and dequantized weights in every row, but score bnb's model only in the "
                         "NF4 + DQ blocksize-64 and int8 rows (equal weights through the same F.linear give equal "
                         "logits); for a slow CPU")  # fmt: skip
    args = ap.parse_args()
    n_tokens = args.tokens or (1024 if args.quick else 6144)
    t0 = time.time()
    tok = load_tokenizer("default")
    ids = tok(reference_text(max_chars=8 * n_tokens), return_tensors="pt").input_ids[0, :n_tokens]
    if ids.numel() < n_tokens:
        raise SystemExit(f"the reference text gave only {ids.numel()} tokens; ask for fewer with --tokens")
    base = load_model("default", bits=16, device="cpu")  # bf16 weights, as load_model casts before quantizing
    ppl: dict[Config, tuple[float, float | None, bool | None]] = {}
    for cfg in configs(args.quick):
        t = time.time()
        if cfg.bits == 16:
            ppl[cfg] = (perplexity(base, ids), None, None)
        else:
            km = kbit_model(base, cfg)
            k_ppl = perplexity(km, ids)
            b_ppl, same = None, None
            if not args.quick:
                bm, same = bnb_model(base, cfg, km)
                spot = cfg.bits == 8 or (cfg.double_quant and cfg.quant_type == "nf4" and cfg.blocksize == 64)
                b_ppl = perplexity(bm, ids) if spot or not args.bnb_spot else None
                del bm
            del km
            ppl[cfg] = (k_ppl, b_ppl, same)
        print(f"  {cfg.label} bs={cfg.blocksize}: {ppl[cfg][:2]} bytes equal={ppl[cfg][2]} ({time.time() - t:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip

    bf16 = ppl[configs(True)[0]][0]
    print(f"\nPerplexity on the first {ids.numel()} tokens of kbit.eval.reference_text (Python "
          f"{platform.python_version()}), 512-token windows; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {time.time() - t0:.0f} s in all\n")  # fmt: skip
    print("| config | blocksize | kbit ppl | bnb ppl | change vs bf16 | bnb bytes = kbit bytes |")
    print("|---|---|---|---|---|---|")
    for cfg, (k, b, same) in ppl.items():
        bs = cfg.blocksize or ("row" if cfg.bits == 8 else "-")
        b_s = f"{b:.4f}" if b is not None else ("-" if same is None else "(same weights)" if same else "not scored")
        same_s = "-" if same is None else ("yes" if same else "NO")
        print(f"| {cfg.label} | {bs} | {k:.4f} | {b_s} | {k / bf16 - 1:+.2%} | {same_s} |")

    print("\nTargets:")
    for bs in (64,) if args.quick else (64, 128):
        nf4 = ppl[Config("NF4 + DQ", 4, "nf4", True, bs)][0]
        nf4_plain = ppl[Config("NF4", 4, "nf4", False, bs)][0]
        fp4 = ppl[Config("FP4 + DQ", 4, "fp4", True, bs)][0]
        met = "met" if nf4 < fp4 else "MISSED"
        print(f"- blocksize {bs}: NF4+DQ increase {nf4 / bf16 - 1:+.2%} < FP4+DQ increase {fp4 / bf16 - 1:+.2%}: {met}")
        dq = nf4 / nf4_plain - 1
        met = "met" if abs(dq) < 1e-3 else f"MISSED by {abs(dq) - 1e-3:.3%}"
        print(f"- blocksize {bs}: double quant changes NF4 perplexity by {dq:+.3%} (target |change| < 0.1%): {met}")
    if not args.quick:
        agree = all(b == k for k, b, _ in ppl.values() if b is not None)
        same = all(s for _, _, s in ppl.values() if s is not None)
        print(f"- kbit and bitsandbytes perplexities identical in every scored row: {'yes' if agree else 'NO'}")
        print(f"- bnb's quantized bytes and dequantized weights equal kbit's in every row: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
