"""The fused 4-bit GEMV (decode-sized ``x @ dequant(W)^T + b + s·(x A^T) B^T``) against dequantize-then-matmul.

The kernel multiplies the same rounded weights the dequantizer writes, in float32, so it is held to float32
summation-order error against a float64 reference built from the dequantized weights (not to bf16 tolerance).
Runs on a GPU, or through Triton's interpreter with ``TRITON_INTERPRET=1 KBIT_TRITON_TEST_DEVICE=cpu``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kbit.quant import dequantize_4bit, quantize_4bit

DEV = os.environ.get("KBIT_TRITON_TEST_DEVICE", "cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and DEV == "cpu"
pytestmark = [] if INTERPRET else [pytest.mark.gpu]

if INTERPRET or torch.cuda.is_available():
    pytest.importorskip("triton")
    from kbit.kernels.triton import gemv4

SHAPES = [(64, 256)] if INTERPRET else [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (96, 320)]


def _reference(x, w, bias, xa, lora_b, scale):
    y = x.double() @ w.double().t()
    if bias is not None:
        y += bias.double()
    if xa is not None:
        y += scale * (xa.double() @ lora_b.double().t())
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("extras", ["none", "bias", "lora", "both"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_matches_dequantized_matmul(shape, nested, extras, quant_type):
    rows = 1
    if not INTERPRET and extras in ("bias", "lora") and shape != (4096, 4096):
        pytest.skip("extras are checked on one shape")
    g = torch.Generator().manual_seed(shape[0] + nested)
    n, k = shape
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, quant_type, 64, nested)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEV) if extras in ("bias", "both") else None
    xa = lora_b = None
    if extras in ("lora", "both"):
        xa = torch.randn(rows, 16, generator=g).to(torch.bfloat16).to(DEV)
        lora_b = (torch.randn(n, 16, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    y = gemv4.gemv_4bit(x, packed, state, bias, xa, lora_b, 2.0)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    deq = dequantize_4bit(packed, state, out_dtype=torch.bfloat16)
    ref = _reference(x, deq, bias, xa, lora_b, 2.0)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 4e-3, err  # the bf16 output rounding (2^-9 relative) is all that may differ
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    rows = 1
    g = torch.Generator().manual_seed(blocksize)
    n, k = (48, 512) if INTERPRET else (1024, 4096)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", blocksize, True)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(DEV)
    y = gemv4.gemv_4bit(x, packed, state)
    ref = _reference(x, dequantize_4bit(packed, state, out_dtype=torch.bfloat16), None, None, None, 1.0)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


def test_more_rows_take_the_dequantize_path():
    from kbit.kernels import dispatch

    g = torch.Generator().manual_seed(9)
    w = (torch.randn(96, 256, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="one row"):
        gemv4.gemv_4bit(x, packed, state)
    expect = torch.nn.functional.linear(x, dequantize_4bit(packed, state, out_dtype=torch.bfloat16))
    assert torch.equal(dispatch.gemv_4bit(x, packed, state), expect)
