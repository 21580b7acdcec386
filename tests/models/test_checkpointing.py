"""Checkpointing modes: "full", "selective", "offload" and "none" give the same loss and LoRA gradients, and differ
only in what the backward recomputes (counted: the matmuls it runs). Mixed per-layer plans: test_memory_plan.py."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from kbit.lora import add_lora, lora_layers
from kbit.models.checkpointing import describe, set_checkpointing
from kbit.models.patch import apply_fast_path
from kbit.nn import Linear4bit

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountMatmuls(TorchDispatchMode):
    """Counts the matmuls that run while it is active, with the contraction length of each."""

    def __init__(self):
        super().__init__()
        self.k: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.k.append(args[1 if func is torch.ops.aten.addmm.default else 0].shape[-1])
        return func(*args, **(kwargs or {}))


def model(fast: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    # hidden 128 > the 64-element contractions selective mode recomputes; LoRA r=4 sits below it.
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    m = LlamaForCausalLM(config).to(device, dtype)
    m.model.layers[0].mlp.down_proj = Linear4bit.from_linear(m.model.layers[0].mlp.down_proj, dtype)
    add_lora(m, r=4, alpha=8, dropout=0.0, dtype=dtype)
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_B.weight.normal_(0, 0.1)
    if fast:
        apply_fast_path(m)
    return m.train()


@pytest.mark.parametrize("fast", [False, True])
def test_modes_give_equal_gradients_and_recompute_what_they_say(fast):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = model(fast)
    results = {}
    for mode in ("none", "full", "selective", "offload"):
        m = copy.deepcopy(base)
        assert set_checkpointing(m, mode) == f"activation checkpointing: {mode} (every decoder layer)"
        m.enable_input_require_grads()  # as checkpointing does, so the backward reaches layer 0's input in all modes
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        with CountMatmuls() as counted:
            loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results[mode] = (loss.detach(), grads, counted.k)
    loss0, grads0, k0 = results["none"]
    for mode in ("full", "selective", "offload"):
        loss, grads, _ = results[mode]
        torch.testing.assert_close(loss, loss0, atol=0, rtol=0)
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-6, msg=f"{mode}: {name}")
    extra = {mode: Counter(results[mode][2]) - Counter(k0) for mode in ("full", "selective", "offload")}
    assert not Counter(k0) - Counter(results["selective"][2])
    # full replays the layers' forward matmuls (all but the last, which nothing saved needs); selective only
    # LoRA's rank-4 up-projections (K = 4): the projections' outputs were kept.
    assert set(extra["selective"]) == {4} and extra["full"][4] == extra["selective"][4] > 0
    assert extra["full"][128] > 0 and extra["full"][256] > 0
    assert extra["offload"] == extra["full"]  # offload recomputes what full does, from a host copy of the input


def test_unknown_mode_is_refused():
    with pytest.raises(
        ValueError, match="checkpointing mode must be one of full, selective, offload, none, got 'some'"
    ):
        set_checkpointing(torch.nn.Linear(1, 1), "some")
    with pytest.raises(ValueError, match="checkpointing: Linear has no transformers decoder layers"):
        set_checkpointing(torch.nn.Linear(1, 1), "full")
    assert set_checkpointing(torch.nn.Linear(1, 1), "none") == "activation checkpointing: none"


def test_mixed_plan_line_names_the_layers():
    m = model(False)
    assert (
        set_checkpointing(m, ("offload", "none")) == "activation checkpointing per layer: layer 0 offload, layer 1 none"
    )
    assert describe(["full", "full", "none", "none", "none"]) == (
        "activation checkpointing per layer: layers 0-1 full, layers 2-4 none"
    )


@pytest.mark.gpu
def test_modes_agree_on_gpu_with_triton_kernels():
    """bf16 on CUDA: the fused Triton ops inside checkpointed layers give the same loss and gradients."""
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    base = model(True, "cuda", torch.bfloat16)
    out = {}
    for mode in ("none", "full", "selective", "offload"):
        m = copy.deepcopy(base)
        set_checkpointing(m, mode)
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        out[mode] = (loss.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    for mode in ("full", "selective", "offload"):
        torch.testing.assert_close(out[mode][0], out["none"][0], atol=1e-3, rtol=1e-3)
        for name, g in out["none"][1].items():  # recomputation replays the same kernels on the same inputs
            rel = (out[mode][1][name] - g).norm() / g.norm()
            assert rel < 1e-2, f"{mode}: {name} differs by {rel:.4f}"
