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


def test_fsdp_split_against_a_loaded_model(tmp_path):
    import torch

    save_tiny_llama(tmp_path, intermediate_size=200)
    model = load_model(tmp_path, quant_storage=torch.bfloat16, device="cpu")  # what FSDP shards: bf16 storage
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    statistics = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())  # replicated buffers
    weights = {id(m.weight) for m in layers}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in weights)
    shape = model_shape(load_config(tmp_path))
    two, four = (estimate(shape, 16, 1, world_size=n, strategy="fsdp") for n in (2, 4))
    assert two.weights == statistics + (packed + other) / 2  # this GPU's shards + every statistic
    assert two.weights - four.weights == (packed + other) / 4
    lora = sum(16 * (o + i) for o, i in shape.linear_shapes)
    assert two.optimizer == 8 * lora / 2  # AdamW's two fp32 moments, sharded
    assert two.gathered == other + 2 * (packed / shape.layers + 2 * lora / shape.layers)  # root + two layers
    off = estimate(shape, 16, 1, world_size=2, strategy="fsdp", cpu_offload=True)
    assert off.weights == statistics and off.optimizer == 0
    assert off.host == (packed + other) / 2 + (8 + 8) * lora / 2  # shards, fp32 masters + grads, moments
    assert off.total < two.total and two.host == 0


def test_activation_offload_keeps_two_layer_inputs():
    shape = model_shape(load_config("llama-3-8b"))
    plain, offloaded = (estimate(shape, 2048, 1, activation_offload=a) for a in (False, True))
    assert plain.activations - offloaded.activations == 2048 * (32 - 2) * 2 * 4096
    assert offloaded.weights == plain.weights and offloaded.logits == plain.logits


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(world_size=2), "strategy none runs one GPU; with 2 GPUs use strategy fsdp or ddp"),
        (dict(world_size=2, strategy="ddp", cpu_offload=True), "cpu_offload offloads FSDP shards; strategy ddp"),
        (dict(world_size=2, strategy="fsdp", optim="adamw_8bit"), "optim adamw_8bit does not run under FSDP"),
        (dict(world_size=2, strategy="fsdp", bits=8), "bits 8: FSDP cannot shard int8 weights"),
        (dict(activation_offload=True, gradient_checkpointing=False), "activation offload moves the checkpointed"),
        (dict(world_size=0, strategy="fsdp"), "gpus must be at least 1, got 0"),
    ],
)
def test_plans_kbit_cannot_run_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        estimate(model_shape(load_config("llama-3-8b")), 2048, 1, **kw)


def test_cli_70b_on_two_gpus(capsys):
    """The docs/distributed.md statement: Llama-2-70B QLoRA at 1 x 2048 per GPU of 2, FSDP (estimates)."""
    assert main(["estimate", "--model", "llama-2-70b", "--gpus", "2", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU of 2 (fsdp)" in out and "| gathered | 1.79 |" in out
    assert "| **total** | **25.17** |" in out
    assert "with activation offload (memory_plan: memory): 22.73 GiB" in out
    assert main(["estimate", "--model", "llama-2-70b", "--gpus", "2", "--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "| **total** | **7.20** |" in out and "| host memory per rank (pinned, not in total) | 17.97 |" in out
    assert main(["estimate", "--model", "llama-2-70b", "--gpus", "2", "--strategy", "none"]) == 2
    assert "strategy none runs one GPU" in capsys.readouterr().err
