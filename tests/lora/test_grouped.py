"""Grouped LoRA projections (kbit.lora.grouped): q/k/v-like siblings on one input as one node, against the same
layers run unfused. Tolerances as in test_fused.py (float32 1e-5, bfloat16 2^-6 of the largest reference value)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from kbit.lora import LoRALinear, group_lora
from kbit.lora.grouped import GroupedLoRAFunction, ProjectionGroup
from kbit.models.checkpointing import selective_policy
from kbit.nn import Linear4bit

IN = 96
OUTS = {"q_proj": 80, "k_proj": 16, "v_proj": 24}
RANKS = {"q_proj": 4, "k_proj": 8, "v_proj": 4}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
GROUP_NODE = "GroupedLoRAFunctionBackward"


def attention(dtype: torch.dtype, bias: bool = True, seed: int = 0, base: str = "nf4") -> nn.Module:
    """A module with q/k/v LoRALinears (different widths and ranks, nonzero B) over NF4 bases in ``dtype``."""
    torch.manual_seed(seed)
    m = nn.Module()
    for name, out in OUTS.items():
        linear = nn.Linear(IN, out, bias=bias)
        if base == "nf4":
            layer = Linear4bit.from_linear(linear, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        else:
            layer = linear.to(dtype).requires_grad_(False)
        lora = LoRALinear(layer, r=RANKS[name], alpha=6, dtype=dtype)
        with torch.no_grad():
            lora.lora_B.weight.normal_(0, 0.5)
        setattr(m, name, lora)
    return m


def twins(dtype: torch.dtype, bias: bool = True) -> tuple[nn.Module, nn.Module]:
    """(grouped, unfused) with the same values."""
    grouped, plain = attention(dtype, bias), attention(dtype, bias)
    for name in OUTS:
        getattr(grouped, name).fused = True
    assert group_lora(grouped) == 1
    return grouped, plain


def run(m: nn.Module, x: torch.Tensor, dys: dict, order=tuple(OUTS), wrap=None):
    """(outputs, grad_fn names, {name: gradient}) of the projections called in ``order`` with ``dys``."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    strides = []
    if x.requires_grad:
        x.register_hook(lambda g: strides.append(g.stride()))  # as autograd hands it over (before any copy)

    def body(t):
        return tuple(getattr(m, name)(t) for name in order)

    ys = (wrap(body) if wrap else body)(x)
    torch.autograd.backward(ys, [dys[name] for name in order])
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["x"], grads["x strides"] = x.grad, torch.tensor(strides)
    return [y.detach() for y in ys], [type(y.grad_fn).__name__ for y in ys], grads


def near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    tol = TOL[dtype]
    atol = tol * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=atol, msg=what)


def data(dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, IN, generator=gen).to(dtype).requires_grad_()
    return x, {name: torch.randn(2, 5, out, generator=gen).to(dtype) for name, out in OUTS.items()}


@pytest.mark.parametrize("pieces", [None, 8])  # each W' rebuilt in row pieces of 8 (a memory plan's dequant_rows)
@pytest.mark.parametrize("order", [("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_unfused(dtype, bias, order, pieces):
    grouped, plain = twins(dtype, bias)
    for name in OUTS:
        getattr(grouped, name).base_layer.dequant_rows = pieces
    x, dys = data(dtype)
    ys, nodes, grads = run(grouped, x, dys, order)
    ys0, nodes0, grads0 = run(plain, x, dys, order)
    assert nodes == [GROUP_NODE] * 3 and GROUP_NODE not in nodes0
    for y, y0, name in zip(ys, ys0, order, strict=True):
        near(y, y0, dtype, name)
    assert grads.keys() == grads0.keys() and "x" in grads
    assert grads.pop("x strides")[0, -2] > IN  # the first columns of the widened gradient, no copy
    assert grads0.pop("x strides")[0, -2] == IN
    for name in grads0:
        if name != "x strides":
            near(grads[name], grads0[name], dtype, name)
    assert grouped.q_proj.group._pending is None  # every output was taken


def test_unused_output_and_frozen_pieces():
    """k never called: its adapter gets no gradient; an input without gradient; a frozen A."""
    grouped, plain = twins(torch.float32)
    x, dys = data(torch.float32)
    some = ("q_proj", "v_proj")
    ys, nodes, grads = run(grouped, x, dys, some)
    _, _, grads0 = run(plain, x, dys, some)
    assert "k_proj.lora_A.weight" not in grads and grads.keys() == grads0.keys()
    for name in grads0:
        if name != "x strides":
            near(grads[name], grads0[name], torch.float32, name)
    grouped.q_proj.group._pending = None  # k's output was never taken
    for m in (grouped, plain):
        m.v_proj.lora_A.weight.requires_grad_(False)
    x.requires_grad_(False)
    _, _, grads = run(grouped, x, dys)
    _, _, grads0 = run(plain, x, dys)
    assert "x" not in grads and "v_proj.lora_A.weight" not in grads and grads.keys() == grads0.keys()
    for name in grads0:
        if name != "x strides":
            near(grads[name], grads0[name], torch.float32, name)


def test_outputs_are_not_reused_after_anything_changes():
    """A second call on the same x after the adapter changed (or a fresh x) recomputes instead of reusing."""
    grouped, _ = twins(torch.float32)
    x, _ = data(torch.float32)
    with torch.no_grad():
        q = grouped.q_proj(x)
        grouped.k_proj.lora_B.weight.add_(1.0)  # an optimizer step between the calls
        k = grouped.k_proj(x)
        grouped.q_proj(x)
        k2 = grouped.k_proj(x.clone())  # not the same tensor: recomputed too
    want = grouped.k_proj.base_layer(x) + grouped.k_proj.scale * (x @ grouped.k_proj.lora_A.weight.t()) @ (
        grouped.k_proj.lora_B.weight.t()
    )
    near(k, want, torch.float32)
    near(k2, want, torch.float32)
    assert q.shape[-1] == OUTS["q_proj"]


@pytest.mark.parametrize("mode", ["non-reentrant", "selective"])
def test_checkpointed(mode):
    grouped, plain = twins(torch.float32)
    x, dys = data(torch.float32)
    wrap = {
        "non-reentrant": lambda fn: lambda t: checkpoint(fn, t, use_reentrant=False),
        "selective": lambda fn: (
            lambda t: checkpoint(
                fn, t, use_reentrant=False, context_fn=lambda: create_selective_checkpoint_contexts(selective_policy)
            )
        ),
    }[mode]
    ys, nodes, grads = run(grouped, x, dys, wrap=wrap)
    _, _, grads0 = run(plain, x, dys)
    # Selective checkpointing is a dispatch mode: the members run as per-projection nodes there.
    assert nodes == [GROUP_NODE] * 3 if mode == "non-reentrant" else GROUP_NODE not in nodes
    for name in grads0:
        if name != "x strides":
            near(grads[name], grads0[name], torch.float32, name)


def test_group_lora_only_groups_fused_nf4_siblings():
    m = nn.ModuleDict({"a": attention(torch.float32), "b": attention(torch.float32, base="linear")})
    for layer in m.modules():
        if isinstance(layer, LoRALinear):
            layer.fused = True
    assert group_lora(m) == 1  # the plain nn.Linear bases keep per-projection nodes
    assert isinstance(m["a"].q_proj.group, ProjectionGroup) and m["b"].q_proj.group is None
    assert group_lora(m, on=False) == 0 and m["a"].v_proj.group is None
    m["a"].k_proj.fused = False
    assert group_lora(m) == 0


def test_group_node_widens_to_a_multiple_of_64():
    grouped, _ = twins(torch.float32)
    x, _ = data(torch.float32)
    ms = [grouped.q_proj, grouped.k_proj, grouped.v_proj]
    tensors = (*(m.bias for m in ms), *(m.lora_A.weight for m in ms), *(m.lora_B.weight for m in ms))
    ys = GroupedLoRAFunction.apply(x, tuple(m.base_layer for m in ms), tuple(m.scale for m in ms), *tensors)
    assert [y.shape[-1] for y in ys] == list(OUTS.values())
    wide = ys[0].grad_fn.saved_tensors[0]
    assert wide.shape == (10, 128)  # 96 + 16 ranks -> 128
    assert torch.equal(wide[:, :IN], x.detach().reshape(10, IN)) and bool((wide[:, IN + 16 :] == 0).all())


@pytest.mark.gpu
def test_gpu_training_shape_matches_unfused():
    """Llama-3-8B q/k/v at 2048 tokens in bf16 on the GPU: grouped against unfused."""
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    mods = []
    for _ in range(2):
        torch.manual_seed(0)
        m = nn.Module()
        for name, out in (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)):
            base = Linear4bit.from_linear(nn.Linear(4096, out, bias=False), compute_dtype=dtype,
                                          quant_type="nf4", compress_statistics=True).to(dev)  # fmt: skip
            lora = LoRALinear(base, r=16, alpha=32, dtype=dtype)
            with torch.no_grad():
                lora.lora_B.weight.normal_(0, 0.02)
            setattr(m, name, lora)
        mods.append(m)
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(mods[0], name).fused = True
    assert group_lora(mods[0]) == 1
    x = torch.randn(1, 2048, 4096, device=dev, dtype=dtype).requires_grad_()
    dys = {n: torch.randn(1, 2048, o, device=dev, dtype=dtype) for n, o in (("q_proj", 4096), ("k_proj", 1024),
                                                                            ("v_proj", 1024))}  # fmt: skip
    ys, nodes, grads = run(mods[0], x, dys)
    ys0, _, grads0 = run(mods[1], x, dys)
    assert nodes == [GROUP_NODE] * 3
    for y, y0 in zip(ys, ys0, strict=True):
        near(y, y0, dtype)
    for name in grads0:
        if name != "x strides":
            near(grads[name], grads0[name], dtype, name)


def test_norm_output_with_spare_columns_is_widened_in_place():
    """An RMSNorm output made with the group's spare columns is X itself (no copy), also for a row range of it."""
    from kbit.kernels import rms_norm

    grouped, plain = twins(torch.float32)
    group = grouped.q_proj.group
    assert group.spare_cols() == 128 - IN
    h, dys = data(torch.float32)
    w = torch.ones(IN)
    for rows in (slice(None), slice(1, 2)):  # the whole batch, and one sequence of it (a chunked MLP's piece)
        x = rms_norm(h, w, 1e-6, spare_cols=group.spare_cols())[rows]
        assert x.stride()[-2] == 128 and torch.equal(x, rms_norm(h, w, 1e-6)[rows])
        ys = [getattr(grouped, n)(x) for n in OUTS]
        wide = ys[0].grad_fn.saved_tensors[0]
        assert wide.data_ptr() == x.data_ptr() and wide.shape == (x.shape[0] * x.shape[1], 128)
        for y, name in zip(ys, OUTS, strict=True):
            near(y.detach(), getattr(plain, name)(x).detach(), torch.float32, name)
        torch.autograd.backward(ys, [dys[n][rows] for n in OUTS])  # the norm's backward takes strided dy
        assert h.grad is not None and bool(torch.isfinite(h.grad).all())
        h.grad = None
