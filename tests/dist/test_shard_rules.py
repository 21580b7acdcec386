"""The in-process rules of kbit.dist: re-viewing packed storage, the one-dtype check, units, strategy choice."""

from __future__ import annotations

import pytest
import torch
from dist_testing import build_model, save_tiny_llama

from kbit.dist import DistContext, StrategyError, decoder_layers, match_quant_storage, resolve_strategy, unit_dtype
from kbit.nn import Linear4bit


@pytest.mark.parametrize("shape", [(64, 96), (6, 7)])  # 6 x 7 = 42 weights: 21 bytes, padded as bf16
def test_set_quant_storage_keeps_every_byte(shape):
    torch.manual_seed(0)
    layer = Linear4bit(shape[1], shape[0], compute_dtype=torch.float32, quant_storage=torch.uint8)
    before = layer.weight.detach().clone()
    weight = layer.dequantize()
    layer.set_quant_storage(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    assert torch.equal(layer.dequantize(), weight)
    layer.set_quant_storage(torch.uint8)  # back: the same bytes, the bf16 padding byte dropped
    assert torch.equal(layer.weight, before)


def test_match_quant_storage_and_unit_dtype(tmp_path):
    save_tiny_llama(tmp_path / "m")
    model = build_model(tmp_path / "m", torch.bfloat16, quant_storage=torch.uint8)
    assert unit_dtype(model) == torch.bfloat16  # frozen norms/embeddings; LoRA masters are fp32 and cast
    assert match_quant_storage(model, torch.bfloat16) == 14  # 7 projections x 2 layers
    assert {m.weight.dtype for m in model.modules() if isinstance(m, Linear4bit)} == {torch.bfloat16}
    assert [p for p, _ in decoder_layers(model)] == ["model.layers.0", "model.layers.1"]
    model.model.norm.weight.data = model.model.norm.weight.data.float()
    with pytest.raises(StrategyError, match=r"frozen weights in one dtype \(.*model.norm.weight is float32"):
        unit_dtype(model)


def test_strategy_choice_in_one_process(tmp_path):
    save_tiny_llama(tmp_path / "m")
    model, one = build_model(tmp_path / "m"), DistContext()
    assert resolve_strategy("auto", one, model) == "none"
    with pytest.raises(StrategyError, match="strategy ddp needs a process group: launch with torchrun"):
        resolve_strategy("ddp", one, model)
    with pytest.raises(StrategyError, match="strategy: must be one of auto, fsdp, ddp, none, got 'zero3'"):
        resolve_strategy("zero3", one, model)
    with pytest.raises(StrategyError, match="strategy none under a launch of 2 processes"):
        resolve_strategy("none", DistContext(rank=0, world_size=2), model)
