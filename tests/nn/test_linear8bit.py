"""Linear8bit: bitsandbytes Linear8bitLt state dicts load exactly, both ways; outputs agree within the
error bound of bitsandbytes' int8 activation quantization (kbit multiplies by the dequantized weight in
floating point)."""

import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kbit.nn import Linear8bit
from kbit.quant import quantize_int8_rowwise

SHAPES = [(40, 96), (33, 17), (1, 64)]


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _weights(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g), torch.randn(out_f, generator=g)


def _bnb_layer(w=None, b=None, out_f=None, in_f=None):
    """A bitsandbytes Linear8bitLt (has_fp16_weights=False); it quantizes on its first ``.to(device)``."""
    out_f, in_f = w.shape if w is not None else (out_f, in_f)
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
    if w is not None:
        layer.load_state_dict({"weight": w, "bias": b})
    return layer.to("cpu")


def _activation_bound(x, w):
    """|bnb - exact| per output: bnb rounds x to fp16 (rel. 2^-11), then to int8 per row (abs.
    0.5 * rowmax / 127), so each output moves by at most that error times sum_k |W[j, k]|; plus 1e-4
    relative for bnb's 1/127^2 literal (6.200124e-05, 1.8e-5 off) and float32 rounding."""
    x16 = x.half().float()
    err = 0.5 * x16.abs().amax(-1, keepdim=True) / 127 + x.abs().amax(-1, keepdim=True) * 2**-11
    return err * w.abs().sum(1) + 1e-4 * (x.abs() @ w.abs().t())


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_bnb_state_dict_loads_into_kbit(out_f, in_f):
    w, b = _weights(out_f, in_f, seed=out_f)
    ref = _bnb_layer(w, b)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight": (torch.int8, (out_f, in_f)),
        "bias": (torch.float32, (out_f,)),
        "SCB": (torch.float32, (out_f,)),
        "weight_format": (torch.uint8, ()),
    }
    layer = Linear8bit(in_f, out_f, compute_dtype=torch.float32)
    layer.load_state_dict(sd)
    back = layer.state_dict()
    assert list(back) == list(sd) and all(_same(back[k], sd[k]) for k in sd)
    assert _same(layer.dequantize(torch.float32), bnbf.int8_vectorwise_dequant(sd["weight"], sd["SCB"]))

    x = torch.randn(2, 3, in_f)
    y = layer(x)
    assert _same(y, nn.functional.linear(x, layer.dequantize(torch.float32), sd["bias"]))
    ref.eval()
    with torch.no_grad():
        y_int8 = ref(x)  # int8 activations x int8 weights
    assert ((y_int8 - y).abs() <= _activation_bound(x, layer.dequantize(torch.float32))).all()
    ref.train()  # bnb's CPU training path dequantizes the weight too: equal up to one rounding per weight
    y_fp = ref(x)
    torch.testing.assert_close(
        y_fp, y, rtol=0, atol=float((x.abs() @ layer.dequantize(torch.float32).abs().t()).max()) * 2**-21
    )


def test_kbit_state_dict_loads_into_bnb():
    w, b = _weights(40, 96, seed=5)
    lin = nn.Linear(96, 40)
    lin.weight.data, lin.bias.data = w, b
    layer = Linear8bit.from_linear(lin, compute_dtype=torch.float32)
    sd = layer.state_dict()
    ref = _bnb_layer(out_f=40, in_f=96)  # bnb must be quantized before it can load int8 weights
    ref.load_state_dict(sd)
    back = ref.state_dict()
    assert list(back) == list(sd) and all(_same(back[k], sd[k]) for k in sd)
    x = torch.randn(4, 96)
    ref.eval()
    with torch.no_grad():
        assert ((ref(x) - layer(x)).abs() <= _activation_bound(x, layer.dequantize(torch.float32))).all()


def test_from_linear_quantizes_like_quantize_int8_rowwise():
    lin = nn.Linear(17, 33).to(torch.bfloat16)
    layer = Linear8bit.from_linear(lin)
    cb, scb = quantize_int8_rowwise(lin.weight.detach())
    assert _same(layer.weight, cb) and _same(layer.SCB, scb) and not layer.weight.requires_grad
    assert _same(layer.bias, lin.bias.detach()) and layer.bias.data_ptr() != lin.bias.data_ptr()
    wrapped = Linear8bit.from_quantized(cb, scb)
    assert wrapped.weight.data_ptr() == cb.data_ptr() and torch.equal(wrapped.dequantize(), layer.dequantize())


def test_gradients_match_linear_on_dequantized_weight(device):
    torch.manual_seed(0)
    layer = Linear8bit(96, 40, compute_dtype=torch.float32, device=device)
    ref = nn.Linear(96, 40, device=device)
    ref.weight.data, ref.bias.data = layer.dequantize(torch.float32), layer.bias.detach().clone()
    x = torch.randn(3, 5, 96, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert layer.weight.grad is None
    if device == "cpu":
        assert torch.equal(x.grad, x_ref.grad)
    else:  # cuBLAS may pick another kernel for autograd's operand layout; fp32 (no TF32) rounding only
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)


def test_dtype_casts_keep_int8_weight_and_fp32_scales():
    layer = Linear8bit(64, 24, bias=False)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 64)
    y = layer(x)
    for cast in (
        nn.Module.half,
        nn.Module.bfloat16,
        lambda m: m.to(torch.float16),
        lambda m: m.type(torch.float64),
    ):
        cast(layer)
        assert layer.SCB.dtype == torch.float32 and layer.weight.dtype == torch.int8
        assert all(_same(v, sd[k]) for k, v in layer.state_dict().items())
        assert torch.equal(layer(x), y)


def test_device_moves_and_meta_loading(device, tmp_path):
    layer = Linear8bit(64, 24)
    ref = layer.dequantize()
    layer.to(device)
    assert {t.device.type for t in [*layer.parameters(), *layer.buffers()]} == {torch.device(device).type}
    assert torch.equal(layer.dequantize().cpu(), ref)
    layer.cpu()
    save_file(layer.state_dict(), str(tmp_path / "l.safetensors"))
    lazy = Linear8bit(64, 24, device="meta")
    assert {k: (v.dtype, v.shape) for k, v in lazy.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in layer.state_dict().items()
    }
    lazy.load_state_dict(load_file(str(tmp_path / "l.safetensors")))  # a meta layer materializes
    x = torch.randn(3, 64)
    assert torch.equal(lazy(x), layer(x))


P = "model.layers.0.mlp."


def _model():
    m, inner = nn.Module(), nn.Module()
    inner.mlp = Linear8bit(32, 16)
    m.model = nn.Module()
    m.model.layers = nn.ModuleList([inner])
    return m


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop(P + "SCB"), f"{P}SCB missing ({P}weight is present"),
        (lambda sd: sd.pop(P + "weight"), f"{P}weight missing ({P}SCB is present"),
        (lambda sd: sd.update({P + "SCB": sd[P + "SCB"][:-1]}), f"{P}SCB is corrupt: expected float32 [16]"),
        (
            lambda sd: sd.update({P + "SCB": sd[P + "SCB"].half()}),
            f"{P}SCB is corrupt: expected float32 [16]",
        ),
        (
            lambda sd: sd.update({P + "weight_format": torch.tensor(1, dtype=torch.uint8)}),
            f"{P}weight_format is 1: only the row-major layout",
        ),
        (
            lambda sd: sd.update({P + "weight": sd[P + "weight"].float()}),
            f"{P}weight must be an int8 [out, in] tensor, got torch.float32 [16, 32] (an unquantized weight?",
        ),
        (lambda sd: sd.update({P + "weight": sd[P + "weight"][:8]}), f"size mismatch for {P}weight"),
    ],
)
def test_corrupt_state_dict_names_the_key(edit, message):
    sd = _model().state_dict()
    edit(sd)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _model().load_state_dict(sd)


def test_old_checkpoints_without_weight_format_load():
    sd = _model().state_dict()
    del sd[P + "weight_format"]
    model = _model()
    model.load_state_dict(sd)
    assert torch.equal(model.model.layers[0].mlp.weight, sd[P + "weight"])
    assert "compute_dtype=bfloat16" in repr(model.model.layers[0].mlp)
