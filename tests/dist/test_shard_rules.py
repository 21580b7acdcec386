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


def test_strategy_chosen_before_loading_from_expected_bytes(tmp_path):
    from kbit.dist.loading import expected_model_bytes, loads_sharded
    from kbit.dist.shard import model_bytes
    from kbit.models.load import load_model

    save_tiny_llama(tmp_path / "m")
    expected = expected_model_bytes(tmp_path / "m")  # from config.json alone: the loaded model's weight bytes
    model = load_model(tmp_path / "m", device="cpu")
    rotary = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())  # not weights
    assert expected == model_bytes(model) - rotary
    two = DistContext(rank=0, world_size=2)
    assert not loads_sharded("fsdp", DistContext(), expected)  # one process: the trainer decides after loading
    assert not loads_sharded("auto", two, None)  # size unknown before loading: decide on the loaded model
    with pytest.raises(StrategyError, match="strategy fsdp needs a process group"):
        loads_sharded("fsdp", two, expected)


def test_cpu_offload_that_the_host_cannot_pin_is_refused():
    from kbit.dist.shard import check_offload_fits

    check_offload_fits(8 * 2**30, 2, available=20 * 2**30)  # 16 GiB of 20: fits
    with pytest.raises(
        StrategyError,
        match=r"cpu_offload: the 2 rank\(s\) on this host would pin 36\.0 GiB of shards in host memory \(18\.0 GiB "
        r"each\), but only 20\.0 GiB is available; spread the run over more hosts",
    ):
        check_offload_fits(18 * 2**30, 2, available=20 * 2**30)


def test_compute_device_of_a_model_sharded_with_cpu_offload():
    from kbit.dist.shard import SHARDING_ATTR, Sharding, compute_device

    model = torch.nn.Linear(2, 2)  # its parameters in host memory, as FSDP's offloaded shards are
    assert compute_device(model) == torch.device("cpu")
    setattr(model, SHARDING_ATTR, Sharding(torch.bfloat16, True, 2, torch.device("cuda", 1)))
    assert compute_device(model) == torch.device("cuda", 1)  # the trainer puts batches where the model computes
