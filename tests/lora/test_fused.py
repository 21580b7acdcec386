"""The fused LoRA node (kbit.lora.fused) against the unfused LoRALinear it replaces.

Tolerances, relative to the largest reference magnitude: float32 1e-5 (the same products summed in another order;
measured at most 2.3e-7); bfloat16 2^-6 (the fused node rounds the LoRA sum once where the unfused path rounds B's
product, its scaling and the sum, each by up to 2^-9 relative; measured at most 6.9e-3). Where the fused node must
not run, results are compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from kbit.lora import LoRALinear, enable_fused_lora
from kbit.lora.fused import row_pieces
from kbit.models.checkpointing import selective_policy
from kbit.models.patch import chunked_apply
from kbit.nn import Linear4bit, Linear8bit

IN, OUT, R, ALPHA = 96, 80, 4, 6  # IN > 64: selective checkpointing saves the base matmul (RECOMPUTE_MAX_K)
KINDS = ("nf4", "int8", "linear")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
FUSED_NODE = "LoRALinearFunctionBackward"


def make_layer(
    kind: str, dtype: torch.dtype, bias: bool = True, fused: bool = False, seed: int = 0, in_f=IN, out_f=OUT, **lora
) -> LoRALinear:
    """A LoRALinear over a ``kind`` base computing in ``dtype`` with nonzero B; the same values for the same seed."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    if kind == "nf4":
        base = Linear4bit.from_linear(linear, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    elif kind == "int8":
        base = Linear8bit.from_linear(linear, compute_dtype=dtype)
    else:
        base = linear.to(dtype)
        base.weight.requires_grad_(False)  # frozen, as add_lora leaves it
    layer = LoRALinear(base, r=R, alpha=ALPHA, dtype=lora.pop("adapter_dtype", dtype), **lora)
    with torch.no_grad():
        layer.lora_B.weight.copy_(0.5 * torch.randn(out_f, R))
    layer.fused = fused
    return layer


def run(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, call=None) -> tuple[torch.Tensor, dict, str]:
    """(output, {name: gradient} for x and every trainable parameter, the output's grad_fn name)."""
    layer.zero_grad(set_to_none=True)  # fresh gradient tensors: earlier results stay as they were
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = (call or layer)(x)
    y.backward(dy)
    grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    if x.requires_grad:
        grads["x"] = x.grad
    return y.detach(), grads, type(y.grad_fn).__name__


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    tol = TOL[dtype]
    atol = tol * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=atol)


def assert_same_results(fused, unfused, dtype: torch.dtype) -> None:
    (y1, g1, node1), (y0, g0, node0) = fused, unfused
    assert node1 == FUSED_NODE and node0 != FUSED_NODE
    assert_near(y1, y0, dtype)
    assert g1.keys() == g0.keys()
    for name in g0:
        assert_near(g1[name], g0[name], dtype)


def inputs(dtype: torch.dtype, shape=(2, 5), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, IN, generator=gen).to(dtype).requires_grad_()
    return x, torch.randn(*shape, OUT, generator=gen).to(dtype)


@pytest.mark.parametrize("pieces", [None, 24])  # W rebuilt in row pieces of 24 (a memory plan's dequant_rows)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused(kind: str, dtype: torch.dtype, bias: bool, pieces: int | None) -> None:
    x, dy = inputs(dtype)  # 3-D: [2, 5, IN]
    layer = make_layer(kind, dtype, bias, fused=True)
    layer.base_layer.dequant_rows = pieces
    assert (row_pieces(layer.base_layer) is None) == (pieces is None)
    fused = run(layer, x, dy)
    unfused = run(make_layer(kind, dtype, bias), x, dy)
    assert_same_results(fused, unfused, dtype)
    assert fused[1].keys() >= {"x", "lora_A.weight", "lora_B.weight"} | ({"base_layer.bias"} if bias else set())


@pytest.mark.parametrize("frozen", [("lora_A",), ("lora_B",), ("lora_A", "lora_B")])
def test_frozen_adapters_and_input(frozen: tuple[str, ...]) -> None:
    layers = [make_layer("nf4", torch.float32, fused=f) for f in (True, False)]
    for layer in layers:
        for name in frozen:
            getattr(layer, name).weight.requires_grad_(False)
    x, dy = inputs(torch.float32)
    assert_same_results(*(run(layer, x, dy) for layer in layers), torch.float32)
    if len(frozen) == 1:  # and no gradient for x (the first layer's input)
        x.requires_grad_(False)
        fused, unfused = (run(layer, x, dy) for layer in layers)
        trainable = {"lora_A", "lora_B"} - set(frozen)
        assert set(fused[1]) == {f"{name}.weight" for name in trainable} | {"base_layer.bias"}
        assert_same_results(fused, unfused, torch.float32)


def _selective(fn):
    return lambda t: checkpoint(
        fn, t, use_reentrant=False, context_fn=lambda: create_selective_checkpoint_contexts(selective_policy)
    )


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "selective"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed(mode: str, dtype: torch.dtype) -> None:
    fused, unfused = make_layer("nf4", dtype, fused=True), make_layer("nf4", dtype)
    wrap = {
        "reentrant": lambda fn: lambda t: checkpoint(fn, t, use_reentrant=True),
        "non-reentrant": lambda fn: lambda t: checkpoint(fn, t, use_reentrant=False),
        "selective": _selective,
    }[mode]
    x, dy = inputs(dtype)
    got = run(fused, x, dy, call=wrap(fused))
    want = run(unfused, x, dy)
    y_plain, grads_plain, _ = run(fused, x, dy)  # the fused node without checkpointing
    assert torch.equal(got[0], y_plain)
    for name in want[1]:
        assert_near(got[1][name], want[1][name], dtype)
        assert torch.equal(got[1][name], grads_plain[name])  # recomputation replays the same node exactly


def test_chunked_mlp_pieces() -> None:
    """An MLP of fused layers run in pieces of 4 tokens (patch.chunked_apply) equals the unfused MLP run whole."""
    dtype = torch.float32
    up = [make_layer("nf4", dtype, fused=f, seed=2) for f in (True, False)]
    down = [make_layer("nf4", dtype, fused=f, seed=3, in_f=OUT, out_f=IN) for f in (True, False)]
    mlps = [nn.Sequential(u, nn.SiLU(), d) for u, d in zip(up, down, strict=True)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, IN, generator=gen).requires_grad_()  # 14 tokens: pieces of 4, 4, 4, 2
    dy = torch.randn(2, 7, IN, generator=gen)
    params = list(mlps[0].parameters())
    got = run(mlps[0], x, dy, call=lambda t: chunked_apply(mlps[0], t, 4, params))
    want = run(mlps[1], x, dy)
    assert_near(got[0], want[0], dtype)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_near(got[1][name], want[1][name], dtype)


def test_autocast() -> None:
    """Under bf16 autocast: bf16 inputs fuse (also over an fp32 nn.Linear, which autocast casts); fp32 inputs do not."""
    bf16 = torch.bfloat16
    x, dy = inputs(bf16)
    cases = [("nf4", bf16), ("int8", bf16), ("linear", torch.float32)]
    for kind, base_dtype in cases:
        layers = [make_layer(kind, base_dtype, adapter_dtype=bf16, fused=f) for f in (True, False)]
        with torch.autocast("cpu", dtype=bf16):
            results = [run(layer, x, dy) for layer in layers]
        assert_same_results(*results, bf16)
    layers = [make_layer("nf4", bf16, fused=f) for f in (True, False)]
    x32, dy32 = x.detach().float().requires_grad_(), dy.float()
    with torch.autocast("cpu", dtype=bf16):
        (y1, g1, node1), (y0, g0, node0) = (run(layer, x32, dy32) for layer in layers)
    assert node1 == node0 != FUSED_NODE
    assert torch.equal(y1, y0) and all(torch.equal(g1[k], g0[k]) for k in g0)


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "adapter_dtype", "trainable_base"])
def test_flag_ignored_where_it_does_not_apply(case: str) -> None:
    """Where the fused node would change the function, the flag changes nothing: same values, bit for bit."""
    kind, lora = "nf4", {}
    if case == "dropout":
        lora = {"dropout": 0.25}
    elif case == "dora":
        lora = {"use_dora": True}
    elif case == "adapter_dtype":
        lora = {"adapter_dtype": torch.bfloat16}  # bf16 adapters on an fp32 base
    elif case == "trainable_base":
        kind = "linear"
    layers = [make_layer(kind, torch.float32, fused=f, **lora) for f in (True, False)]
    for layer in layers:
        if case == "disabled":
            layer.enabled = False
        if case == "trainable_base":
            layer.base_layer.weight.requires_grad_(True)
    x, dy = inputs(torch.float32)
    results = []
    for layer in layers:
        with torch.random.fork_rng():
            torch.manual_seed(7)  # the same dropout masks for both
            results.append(run(layer, x, dy))
    (y1, g1, node1), (y0, g0, node0) = results
    assert node1 == node0 != FUSED_NODE
    assert torch.equal(y1, y0)
    assert g1.keys() == g0.keys()
    for k in g0:  # a disabled adapter gets no gradient in either
        assert (g1[k] is None and g0[k] is None) or torch.equal(g1[k], g0[k])


def test_dropout_layer_fuses_in_eval() -> None:
    layers = [make_layer("nf4", torch.float32, fused=f, dropout=0.25).eval() for f in (True, False)]
    x, dy = inputs(torch.float32)
    assert_same_results(*(run(layer, x, dy) for layer in layers), torch.float32)


def test_enable_fused_lora_counts_qualifying_layers() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    model = nn.ModuleList(
        [
            make_layer("nf4", bf16),  # counts
            make_layer("int8", f32),  # counts
            make_layer("linear", f32),  # counts
            make_layer("nf4", f32, adapter_dtype=bf16),  # adapter dtype is not the compute dtype
            make_layer("nf4", f32, use_dora=True),
            make_layer("nf4", f32, dropout=0.1),
        ]
    )
    assert enable_fused_lora(model) == 3
    assert all(layer.fused for layer in model)
    assert "fused=True" in repr(model[0])
    assert enable_fused_lora(model, on=False) == 0
    assert not any(layer.fused for layer in model)


@pytest.mark.parametrize("plan", ["none", "full", "selective"])
def test_model_step_equals_unfused(plan: str) -> None:
    """A tiny NF4 Llama with LoRA on all seven projections, patched for the fast path with MLPs in pieces of 8
    tokens: the fused model's loss and adapter gradients equal the unfused model's (unpatched pieces, no
    checkpointing) within float32 rounding."""
    pytest.importorskip("transformers")
    from kbit_testing import tiny_llama

    from kbit.lora import add_lora, lora_layers
    from kbit.models.checkpointing import set_checkpointing
    from kbit.models.patch import apply_fast_path, mlp_chunking

    models = []
    for _twin in range(2):  # fused, unfused
        model = tiny_llama()
        for path, module in list(model.named_modules()):
            if type(module) is nn.Linear and path != "lm_head":
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, Linear4bit.from_linear(module, compute_dtype=torch.float32))
        add_lora(model, r=4, alpha=8, dropout=0.0, dtype=torch.float32)
        torch.manual_seed(5)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        model.train()
        models.append(model)
    assert enable_fused_lora(models[0]) == 2 * 7
    assert "x14 (4 q/k/v or gate/up groups)" in apply_fast_path(models[0])  # kbit.lora.grouped's nodes
    layer = models[0].model.layers[0]  # the norms feeding the groups leave them 64 - 64 + 64 spare columns
    assert layer.input_layernorm._kbit_spare_cols == layer.post_attention_layernorm._kbit_spare_cols == 64
    set_checkpointing(models[0], plan)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    with mlp_chunking(models[0], 8):
        loss = models[0](input_ids=ids, labels=ids).loss
        loss.backward()
    ref = models[1](input_ids=ids, labels=ids).loss
    ref.backward()
    assert_near(loss.detach(), ref.detach(), torch.float32)
    for (_, mine), (_, theirs) in zip(lora_layers(models[0]), lora_layers(models[1]), strict=True):
        for name in ("lora_A", "lora_B"):
            assert_near(getattr(mine, name).weight.grad, getattr(theirs, name).weight.grad, torch.float32)


# --- GPU: training shapes, and no [M, out] temporaries ------------------------------------------------------------


def _gpu_layer(in_f: int, out_f: int, fused: bool, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    base = Linear4bit(in_f, out_f, bias=False, device="cuda")  # NF4 + DQ, bf16 compute
    layer = LoRALinear(base, r=16, alpha=32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    layer.fused = fused
    return layer


@pytest.mark.gpu
def test_gpu_training_shape_matches_unfused() -> None:
    """x [4096, 4096] bf16 through a 4096 -> 14336 NF4 projection under autocast: fused equals unfused within bf16
    rounding, and is no further than the unfused path from float32 arithmetic on the same bf16 values."""
    bf16 = torch.bfloat16
    fused_layer, layer = _gpu_layer(4096, 14336, True), _gpu_layer(4096, 14336, False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, 4096, device="cuda", generator=gen).to(bf16).requires_grad_()
    dy = torch.randn(4096, 14336, device="cuda", generator=gen).to(bf16)
    with torch.autocast("cuda", dtype=bf16):
        fused, unfused = run(fused_layer, x, dy), run(layer, x, dy)
    assert_same_results(fused, unfused, bf16)
    w = layer.base_layer.dequantize(bf16).float()
    a, b, s = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float(), layer.scale
    xf, dyf = x.detach().float(), dy.float()
    exact = {
        "y": xf @ w.T + s * (xf @ a.T) @ b.T,
        "x": dyf @ w + s * (dyf @ b) @ a,
        "lora_A.weight": s * (dyf @ b).T @ xf,
        "lora_B.weight": s * dyf.T @ (xf @ a.T),
    }
    for name, ref in exact.items():
        err = [((r[0] if name == "y" else r[1][name]).float() - ref).norm() / ref.norm() for r in (fused, unfused)]
        assert err[0] <= 1.05 * err[1] + 1e-4, (name, err)


def _peak_extra(fn) -> int:
    """Bytes ``fn`` allocates at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _forward_backward_extra(layer: LoRALinear, x: torch.Tensor, dy: torch.Tensor) -> tuple[int, int]:
    """Peak bytes above the live ones in the forward and in the backward (after a warm-up pass)."""
    inputs = [x, layer.lora_A.weight, layer.lora_B.weight]
    for _ in range(2):  # the first pass allocates cuBLAS workspaces (this thread's and autograd's)
        torch.autograd.grad(layer(x), inputs, dy)
    out: list = []
    forward = _peak_extra(lambda: out.append(layer(x)))
    backward = _peak_extra(lambda: out.append(torch.autograd.grad(out.pop(), inputs, dy)))
    return forward, backward


@pytest.mark.gpu
def test_gpu_no_output_sized_temporaries() -> None:
    """Forward: only y (added into in place) and the dequantized W; backward: only dx and W. The shapes make one
    [M, out] tensor (64 MiB) larger than W + dx (8 + 16 MiB), so any such temporary breaks the bound; the unfused
    path is measured the same way to show that the bound sees one."""
    m, in_f, out_f = 8192, 1024, 4096
    x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
    mo, w, mi = m * out_f * 2, out_f * in_f * 2, m * in_f * 2  # bytes of [M, out], W, [M, in]
    slack = mo // 8  # room for rank-r tensors, adapter gradients and the double-quant scales
    fwd, bwd = _forward_backward_extra(_gpu_layer(in_f, out_f, True), x, dy)
    assert fwd <= mo + w + slack and bwd <= mi + w + slack, (fwd, bwd)
    fwd, bwd = _forward_backward_extra(_gpu_layer(in_f, out_f, False), x, dy)
    assert fwd > mo + w + slack and bwd > mi + w + slack, (fwd, bwd)  # the unfused path's [M, out] temporaries
