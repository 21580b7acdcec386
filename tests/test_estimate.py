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


# ---- the longest sequence (fast path, memory_plan speed) ----


def test_fast_layer_cost_counts_what_the_probe_measures():
    """The per-token count of --longest against the memory plan's probe on a patched bf16 model (GQA, LoRA on all
    seven projections), with the MLP whole and in pieces."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbit.estimate import fast_layer_cost
    from kbit.lora import add_lora
    from kbit.models.memory_plan import _probe
    from kbit.models.patch import apply_fast_path, mlp_chunking

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    add_lora(model, r=4, alpha=8, dropout=0.0, dtype=torch.bfloat16)  # as the bench and the runs
    apply_fast_path(model)
    shape = model_shape(config)
    assert (shape.heads, shape.kv_dim, shape.per_layer_linears) == (4, 32, 7)
    for rows in (0, 16):
        with mlp_chunking(model, rows):
            probe = _probe(model.train(), 1, 64, None)
        cost, pieces = fast_layer_cost(shape, 64, lora_r=4, mlp_rows=rows)
        assert (cost.keep, cost.input) == (probe.keep, probe.input) and pieces == (rows or None)
    whole = fast_layer_cost(shape, 64, lora_r=4, mlp_rows=0)[0].keep
    assert cost.workspace == 2 * (whole - cost.keep) * 16 // 64  # one piece's intermediates and their gradients


def test_longest_sequence_of_the_8b_shape():
    from kbit.estimate import long_context, longest_seq_len, pinned_bytes
    from kbit.models.offload import PAGE_BYTES

    shape = model_shape(load_config("llama-3-8b"))
    gib = 2**30
    at = long_context(shape, 400_000, 80 * gib, 128 * gib)
    # 400k tokens: layer inputs of 3.05 GiB, pinned exactly (whole pages, not torch's power-of-two blocks of 4 GiB);
    # 3 stay on the GPU, 29 go to host memory
    assert pinned_bytes(400_000 * 4096 * 2) == 400_000 * 4096 * 2  # 800,000 pages of 4 KiB (50,000 of 64 KiB)
    page = PAGE_BYTES
    assert pinned_bytes(1) == pinned_bytes(page) == page and pinned_bytes(page + 1) == 2 * page
    assert at.modes == ("offload",) * 29 + ("full",) * 3 and at.mlp_rows == 16384
    assert at.fits and at.host == 29 * 400_000 * 4096 * 2 + 4 * gib and 73 * gib < at.gpu < 75 * gib
    best = longest_seq_len(shape, 80 * gib, 128 * gib)
    assert best.fits and not long_context(shape, best.seq_len + 1, 80 * gib, 128 * gib).fits
    gpu_only = longest_seq_len(shape, 80 * gib)
    assert best.seq_len == gpu_only.seq_len == 484_725  # GPU-bound: 32 inputs of 3.70 GiB + the process fit 128
    assert best.modes == ("offload",) * 32 and 122 * gib < best.host < 123 * gib
    assert not long_context(shape, gpu_only.seq_len + 1, 80 * gib).fits_gpu
    small_host = longest_seq_len(shape, 80 * gib, 100 * gib)  # host-bound: 30 inputs + the process in 100 GiB
    assert small_host.seq_len == 419_430 and small_host.modes.count("offload") == 30
    assert small_host.host <= 100 * gib < long_context(shape, small_host.seq_len + 1, 80 * gib, 100 * gib).host
    assert longest_seq_len(shape, 5 * gib) is None  # the weights alone take more


def test_longest_sequence_below_and_above_the_mlp_pieces():
    """Memory needs grow with the length on both sides of the switch to MLP pieces (16,384 tokens for the 8B shape):
    a small GPU's longest lies below it, a larger one's above."""
    from kbit.estimate import long_context, longest_seq_len

    shape = model_shape(load_config("llama-3-8b"))
    gib = 2**30
    for gpu in (10, 12, 16, 24):
        best = longest_seq_len(shape, gpu * gib)
        assert best.fits_gpu and not long_context(shape, best.seq_len + 1, gpu * gib).fits_gpu, gpu
        assert (best.mlp_rows is None) == (best.seq_len <= 16384), gpu
    for gpu in (12, 13):  # what fits is every length up to one: no length fits again past the switch
        fits = [long_context(shape, t, gpu * gib).fits for t in range(12_000, 24_000, 250)]
        assert fits == sorted(fits, reverse=True) and True in fits and False in fits, gpu


def test_cli_longest(capsys):
    args = ["estimate", "--model", "llama-3-8b", "--longest", "--gpu-memory", "80", "--host-memory", "128",
            "--seq-len", "400000"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "longest sequence at batch 1 that kbit train fits in 80 GiB of GPU memory and 128 GiB of host memory (fast "
        "path, memory_plan speed):\n  484,725 tokens: 32 recomputed from CPU-offloaded inputs; MLP in pieces of "
        "16384 tokens; GPU 76.3 GiB, host 122.3 GiB (bound by GPU memory)\n  at 400,000 tokens: 3 recomputed, 29 "
        "recomputed from CPU-offloaded inputs; MLP in pieces of 16384 tokens; GPU 73.8 GiB, host 92.5 GiB: fits"
    ) in out
    args[args.index("128")] = "100"
    assert main(args) == 0
    assert "(bound by host memory (pinned layer inputs); GPU memory alone: 484,725 tokens)" in capsys.readouterr().out
    assert main(["estimate", "--model", "llama-3-8b", "--longest", "--gpu-memory", "4"]) == 0
    assert "  none: not even one token" in capsys.readouterr().out
