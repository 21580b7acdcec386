"""The CPU path of ``dispatch.gemv_4bit``: dequantize to the input dtype, multiply, add the LoRA branch in fp32."""

import torch

from kbit.kernels import dispatch
from kbit.quant import dequantize_4bit, quantize_4bit


def test_dispatch_falls_back_to_reference_on_cpu():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g).to(torch.bfloat16)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(2, 128, generator=g).to(torch.bfloat16)
    xa, lb = torch.randn(2, 4, generator=g), torch.randn(48, 4, generator=g)
    y = dispatch.gemv_4bit(x, packed, state, None, xa, lb, 0.5)
    deq = dequantize_4bit(packed, state, out_dtype=torch.bfloat16)
    expect = (torch.nn.functional.linear(x, deq).float() + 0.5 * xa @ lb.t()).to(torch.bfloat16)
    assert torch.equal(y, expect)
