"""LoftQ initialisation: a smaller error than plain NF4 at the same storage, in bitsandbytes' format.

Margins are measured, not guessed: on the 256x512 Gaussian matrix below plain NF4 + DQ has a relative error of
0.0920 and LoftQ (r=16, 5 iterations: 0.0844, 0.0797, 0.0775, 0.0761, 0.0753) 0.0753, -18%; the test asks for -10%.
On the tiny Llama (hidden 64, r=16) the mean |logit error| against the fp32 model is 0.0142 for NF4 + zero-init LoRA
and 0.0061 for LoftQ (2.3x smaller); the test asks for 1.5x.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from kbit_testing import tiny_llama  # noqa: E402

from kbit.lora import add_lora  # noqa: E402
from kbit.lora.loftq import loftq_decompose, loftq_quantize  # noqa: E402
from kbit.nn import Linear4bit  # noqa: E402
from kbit.quant import dequantize_4bit, quantize_4bit  # noqa: E402


def gaussian(shape=(256, 512), dtype=torch.float32, seed=0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def test_loftq_shrinks_the_weight_error_on_a_random_matrix():
    w = gaussian()
    res = loftq_decompose(w, r=16, scale=2.0, iters=5)
    plain = (w - dequantize_4bit(*quantize_4bit(w, "nf4", 64, True), torch.float32)).norm() / w.norm()
    effective = dequantize_4bit(res.packed, res.state, torch.float32) + 2.0 * res.lora_B @ res.lora_A
    loftq = (w - effective).norm() / w.norm()
    assert res.error_nf4 == pytest.approx(plain.item(), rel=1e-6)
    assert loftq.item() == pytest.approx(res.error, rel=1e-4)  # the reported error is the effective weight's
    assert loftq < 0.9 * plain, f"LoftQ error {loftq:.4f} vs plain NF4 {plain:.4f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_weight_is_exactly_kbit_quantization_of_what_it_quantized(dtype):
    w = gaussian(dtype=dtype)
    res = loftq_decompose(w, r=8, scale=2.0, iters=3)
    packed, state = quantize_4bit(res.quantized_from, "nf4", 64, True)
    assert res.quantized_from.dtype == dtype
    assert torch.equal(res.packed, packed)
    assert torch.equal(res.state.absmax, state.absmax) and torch.equal(res.state.nested_absmax, state.nested_absmax)
    assert res.state.offset == state.offset
    # One iteration quantizes W itself: the bytes of plain QLoRA, with the SVD of its residual as the adapter.
    first = loftq_decompose(w, r=8, scale=2.0, iters=1)
    assert torch.equal(first.packed, quantize_4bit(w, "nf4", 64, True)[0])


def test_loftq_errors_are_refused_with_one_line():
    with pytest.raises(ValueError, match="iters"):
        loftq_decompose(gaussian(), r=4, scale=1.0, iters=0)
    with pytest.raises(ValueError, match="r must be"):
        loftq_decompose(gaussian((8, 16)), r=9, scale=1.0)
    with pytest.raises(ValueError, match="add_lora"):
        loftq_quantize(tiny_llama())


def test_tiny_llama_with_loftq_is_closer_to_the_dense_model_than_nf4():
    dense = tiny_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits

    torch.manual_seed(0)
    nf4 = add_lora(copy.deepcopy(dense), r=16, dropout=0.0, dtype=torch.float32)
    for _, module in list(nf4.named_modules()):
        if hasattr(module, "base_layer") and type(module.base_layer) is nn.Linear:
            module.base_layer = Linear4bit.from_linear(module.base_layer, torch.float32)  # B = 0: plain QLoRA
    torch.manual_seed(0)
    loftq = add_lora(copy.deepcopy(dense), r=16, dropout=0.0, dtype=torch.float32)
    errors = loftq_quantize(loftq, iters=5)

    assert all(isinstance(m.base_layer, Linear4bit) for m in loftq.modules() if hasattr(m, "base_layer"))
    assert all(after < before for before, after in errors.values())
    with torch.no_grad():
        err_nf4 = (nf4(ids).logits - ref).abs().mean()
        err_loftq = (loftq(ids).logits - ref).abs().mean()
    assert err_loftq * 1.5 < err_nf4, f"mean |logit error|: LoftQ {err_loftq:.3e}, NF4 {err_nf4:.3e}"
