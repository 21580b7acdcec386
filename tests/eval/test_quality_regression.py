"""The NF4 + double-quant perplexity of the embedded default model is pinned, so a kernel change that hurts accuracy
fails CI.

Golden value: ``perplexity(load_model("default"), ids)`` (NF4, double quant, blocksize 64, bf16 compute, CPU) on the
first 512 tokens of ``reference_text(4096)``, measured with Python 3.11.7, torch 2.13.0+cpu, transformers 5.x on the
2-core CI CPU (2026-11-23); ``bench/quality.py`` measures the same model on longer text (docs/quality.md).

Tolerance 0.5% (relative). The computation is deterministic on a given torch build, so the slack only absorbs other
CPUs' / torch builds' bf16 matmul rounding. Measured effects of real accuracy bugs on the same 512 tokens: every
absmax 1% too large: 14.7336 (+0.77%, fails); FP4 codes instead of NF4: 17.7044 (+21%, fails). Double quantization
itself moves perplexity by only ~0.02%, so a broken nested absmax (wrong scale or offset) shows as a per-block scale
error like the first case. The reference text is the standard library's docstrings, which change between Python minor
versions: the test skips on any other minor version. To re-pin, run the test's three lines by hand
(``load_model("default", device="cpu")``, the same ``ids``, ``perplexity``) and update the constants.
"""

import sys

import pytest

from kbit.eval import perplexity, reference_text

PINNED_PYTHON = (3, 11)
NF4_DQ_PPL = 14.620821216476077
FP4_DQ_PPL = 17.70442154157022  # load_model("default", quant_type="fp4"), same tokens: what a wrong codebook gives
REL_TOL = 5e-3


@pytest.mark.slow
@pytest.mark.skipif(
    sys.version_info[:2] != PINNED_PYTHON,
    reason=f"the golden perplexity was measured on Python {PINNED_PYTHON[0]}.{PINNED_PYTHON[1]}; the reference text "
    "(stdlib docstrings) differs on other minor versions",
)
def test_default_model_nf4_perplexity_is_pinned(default_model):
    model, tok = default_model
    ids = tok(reference_text(max_chars=4096), return_tensors="pt").input_ids[0, :512]
    assert ids.numel() == 512
    ppl = perplexity(model, ids)
    assert ppl == pytest.approx(NF4_DQ_PPL, rel=REL_TOL), (
        f"NF4 + DQ perplexity of the default model is {ppl:.4f}, pinned at {NF4_DQ_PPL:.4f} (±{REL_TOL:.1%}): "
        "a quantization or kernel change has hurt accuracy, or the platform's rounding differs"
    )
