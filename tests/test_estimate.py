"""kbit estimate: exact weight bytes, monotone activations, and a largest batch consistent with the estimate."""

import pytest
from kbit_testing import save_tiny_llama

from kbit.cli import main
from kbit.estimate import PRESETS, estimate, largest_batch, linear_bytes, load_config, model_shape
from kbit.models import load_model
from kbit.nn import Linear4bit, Linear8bit


@pytest.mark.parametrize("bits, dq", [(4, True), (4, False), (8, False)])
def test_linear_bytes_equal_a_loaded_model(tmp_path, bits, dq):
    save_tiny_llama(tmp_path, intermediate_size=200)  # 200*64 = 12,800: blocks not a multiple of 256
    model = load_model(tmp_path, bits=bits, double_quant=dq, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bit))]
    held = sum(t.numel() * t.element_size() for m in layers for t in [m.weight, *m.buffers()])
    assert held == sum(linear_bytes(m.out_features, m.in_features, bits, dq) for m in layers)
    shape = model_shape(load_config(tmp_path))
    assert sorted(shape.linear_shapes) == sorted((m.out_features, m.in_features) for m in layers)


def test_parts_and_largest_batch():
    shape = model_shape(load_config("llama-3-8b"))
    assert shape.layers == 32 and shape.kv_dim == 1024 and len(shape.linear_shapes) == 7 * 32
    one, eight = estimate(shape, 2048, 1), estimate(shape, 2048, 8)
    assert one.weights == eight.weights and eight.activations == pytest.approx(8 * one.activations)
    assert 4.5 * 2**30 < one.weights < 6 * 2**30  # 7.0B linear params at ~4.1 bits + 1.05B x 2 x 16 bits
    assert estimate(shape, 2048, 1, gradient_checkpointing=False).activations > 5 * one.activations
    b = largest_batch(shape, 40 * 2**30, 2048)
    assert estimate(shape, 2048, b).total <= 40 * 2**30 < estimate(shape, 2048, b + 1).total
    assert estimate(shape, 2048, 1, optim="paged_adamw_8bit").optimizer == 0
    with pytest.raises(ValueError, match="optim 'sgd' is not known"):
        estimate(shape, 2048, 1, optim="sgd")


def test_cli(capsys):
    assert main(["estimate", "--model", "llama-2-70b", "--batch", "1", "--gpu-memory", "48"]) == 0
    out = capsys.readouterr().out
    assert "| weights |" in out and "largest batch of 2048-token sequences that fits 48 GiB" in out
    assert set(PRESETS) == {"llama-3-8b", "llama-2-70b"}
