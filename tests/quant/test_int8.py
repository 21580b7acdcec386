"""Row-wise int8 (LLM.int8 weight format) equals bitsandbytes' Int8Params quantization."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from kbit.quant import dequantize_int8_rowwise, quantize_int8_rowwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_bnb(dtype):
    w = (torch.randn(96, 130) * torch.rand(96, 1) * 4).to(dtype)
    cb_ref, scb_ref, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    cb, scb = quantize_int8_rowwise(w)
    assert torch.equal(cb, cb_ref) and torch.equal(scb, scb_ref)
    assert torch.equal(dequantize_int8_rowwise(cb, scb), bnbf.int8_vectorwise_dequant(cb_ref, scb_ref))
    rel = (dequantize_int8_rowwise(cb, scb) - w.float()).norm() / w.float().norm()
    assert rel < 0.01  # 127 levels per row: ~0.5% RMS error on Gaussian rows


def test_zero_row_and_errors():
    w = torch.randn(3, 8)
    w[1] = 0
    cb, scb = quantize_int8_rowwise(w)
    assert scb[1] == 0 and torch.equal(cb[1], torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_int8_rowwise(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="overflows float16"):
        quantize_int8_rowwise(torch.full((2, 2), 1e6))
