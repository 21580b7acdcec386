"""Do the frozen norms (and embeddings) of a 4-bit model need float32, as `prepare_model_for_kbit_training` makes them?

    python bench/norm_precision.py [--tokens 2048]

Loads the embedded SmolLM2-135M-Instruct in NF4 + double quant with everything else in bf16 (kbit's default), then
the same model with every unquantized parameter (norms, embeddings, tied head) in float32, which is what PEFT's
`prepare_model_for_kbit_training` does (the residual stream then runs in float32 too), and compares their next-token
distributions on the reference text (stdlib docstrings) with the KL divergence and perplexity, next to the gap that
4-bit quantization itself opens (the bf16 model against the NF4 one). HF's RMSNorm already normalises in float32.
"""

from __future__ import annotations

import argparse

import torch

from kbit.eval import compare_models, reference_text
from kbit.models import load_model, load_tokenizer


def main() -> None:
    """Print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    tok = load_tokenizer("default")
    ids = tok(reference_text(max_chars=8 * args.tokens), return_tensors="pt").input_ids[0, : args.tokens]
    base = load_model("default", device="cpu")  # NF4 + DQ, norms and embeddings bf16
    rows = []
    for label, which in (("norms + embeddings + head fp32 (PEFT's prepare)", ("norm", "embed", "lm_head")),):
        other = load_model("default", device="cpu")
        ref16 = load_model("default", bits=16, compute_dtype=torch.float32, device="cpu")
        for name, p in other.named_parameters():
            if any(w in name for w in which):
                p.data = dict(ref16.named_parameters())[name].data.float()
        rows.append((label, compare_models(other, base, ids)))
        del other, ref16
    bf16 = load_model("default", bits=16, device="cpu")
    rows.append(("4-bit vs bf16 model (for scale)", compare_models(bf16, base, ids)))
    print(f"\nKL(reference || kbit default: NF4+DQ, norms/embeddings bf16) on {ids.numel()} tokens of reference text\n")
    print("| reference model | KL nats/token | ppl reference | ppl kbit default |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r.kl:.2e} | {r.ppl_reference:.3f} | {r.ppl_candidate:.3f} |")


if __name__ == "__main__":
    main()
