"""Long inputs: the patched MLP in pieces equals the whole MLP (values, gradients, dropout replayed) and holds one
piece's intermediates at a time; a long sequence trains as it does unchunked with no T x T mask; the memory plan
probes the chunked layer; bench/train_step.py's long-context and profile paths run on the CPU.

Pieces are forced small (``mlp_chunking``) so that tiny models take the path the 8B shape takes above 16,384 tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kbit_testing import FAMILY_CONFIGS, TINY, kept_bytes_per_layer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kbit.lora import add_lora, lora_layers
from kbit.models.checkpointing import decoder_layers, set_checkpointing
from kbit.models.memory_plan import GIB, MemoryPlan, _probe, apply_plan, measure_layer_cost, plan_memory
from kbit.models.patch import (
    apply_fast_path,
    auto_chunk_rows,
    mlp_chunk_rows,
    mlp_chunking,
    recompute_chunk_rows,
)
from kbit.nn import Linear4bit

# fp32 on the CPU: a piece's rows come out of a smaller matmul, so they may differ in the last bits (measured: 1e-8
# on values, 1e-6 on the LoRA gradients, which also sum over pieces).
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(model_type: str = "llama", dtype=torch.float32, dropout: float = 0.0, quantize: bool = True, **shape):
    """A patched random model with NF4 linears and LoRA (nonzero B) on all seven projections, in train mode."""
    config = AutoConfig.for_model(model_type, **(TINY | FAMILY_CONFIGS[model_type] | shape))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantize:
        head = model.get_output_embeddings()
        for name, mod in list(model.named_modules()):
            if type(mod) is nn.Linear and mod is not head:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Linear4bit.from_linear(mod, compute_dtype=dtype))
    add_lora(model, r=4, alpha=8, dropout=dropout, dtype=dtype)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    apply_fast_path(model)
    return model.train()


def mlp_grads(model, x, dy, rows, seed=0):
    """(output, input gradient, MLP parameter gradients) of the first layer's MLP with pieces of ``rows``."""
    mlp = decoder_layers(model)[0].mlp
    x = x.detach().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with mlp_chunking(model, rows):
        y = mlp(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # separate gate/up projections, and Phi3's fused one
def test_mlp_in_pieces_equals_the_whole_mlp(model_type):
    model = tiny(model_type)
    x, dy = torch.randn(2, 25, 64), torch.randn(2, 25, 64)  # 50 tokens: the pieces do not divide them evenly
    y0, dx0, g0 = mlp_grads(model, x, dy, 0)
    assert len(g0) == (6 if model_type == "llama" else 4)  # LoRA A and B of each projection
    for rows in (7, 16, 49):
        y, dx, g = mlp_grads(model, x, dy, rows)
        torch.testing.assert_close(y, y0, **TOL)
        torch.testing.assert_close(dx, dx0, **TOL)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], **TOL, msg=name)


def test_mlp_in_pieces_bf16_within_rounding():
    """bf16: each piece rounds its matmuls and the LoRA gradients are summed per piece (in float32, rounded once)."""
    model = tiny(dtype=torch.bfloat16)
    x, dy = torch.randn(1, 96, 64, dtype=torch.bfloat16), torch.randn(1, 96, 64, dtype=torch.bfloat16)
    y0, dx0, g0 = mlp_grads(model, x, dy, 0)
    y, dx, g = mlp_grads(model, x, dy, 32)
    torch.testing.assert_close(y, y0, atol=2e-2, rtol=1.6e-2)  # bf16's own tolerance
    torch.testing.assert_close(dx, dx0, atol=2e-2, rtol=1.6e-2)
    for name in g0:  # a wrong piece would be off by O(1), not by a percent of the norm
        rel = (g[name].float() - g0[name].float()).norm() / g0[name].float().norm()
        assert rel < 1e-2, f"{name}: {rel:.4f}"


def test_dropout_masks_are_replayed_in_the_backward():
    """With LoRA dropout the pieces draw their masks piece by piece (the whole MLP draws them in another order); the
    backward's recomputation draws exactly the forward's, so the gradients are those of autograd through the same
    pieces, and the backward leaves the global RNG where the forward left it."""
    model = tiny(dropout=0.3)
    mlp = decoder_layers(model)[0].mlp
    x, dy = torch.randn(40, 64), torch.randn(40, 64)
    xr = x.clone().requires_grad_(True)  # reference: the same pieces, kept by autograd
    torch.manual_seed(5)
    y_ref = torch.cat([mlp(piece) for piece in xr.split(16)])
    y_ref.backward(dy)
    g_ref = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    xc = x.clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with mlp_chunking(model, 16):
        y = mlp(xc)
    after_forward = torch.get_rng_state()
    y.backward(dy)
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)  # the same masks, the same pieces
    torch.testing.assert_close(xc.grad, xr.grad, atol=0, rtol=0)
    for name, g in g_ref.items():
        torch.testing.assert_close(mlp.get_parameter(name).grad, g, atol=1e-6, rtol=1e-6, msg=name)
    _, _, whole = mlp_grads(model, x, dy, 0, seed=5)
    assert not all(torch.equal(whole[n], g_ref[n]) for n in g_ref)  # the whole MLP drew other masks


def peak_bytes(fn) -> int:
    """The most bytes the CPU allocator held above its starting point while ``fn`` ran (the profiler's records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_pieces_hold_one_piece_of_intermediates():
    """Measured with the CPU allocator: forward and backward of the MLP in pieces peak at a few [T, hidden] tensors plus
    one piece's [rows, intermediate] ones, not at the whole input's intermediates; the forward saves only its input."""
    tokens, hidden, inter, rows = 2048, 32, 1024, 128
    model = tiny(quantize=False, hidden_size=hidden, intermediate_size=inter, num_attention_heads=2,
                 num_key_value_heads=1)  # fmt: skip
    mlp = decoder_layers(model)[0].mlp
    x, dy = torch.randn(tokens, hidden, requires_grad=True), torch.randn(tokens, hidden)

    def step(r):
        def run():
            with mlp_chunking(model, r):
                mlp(x).backward(dy)

        return run

    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with mlp_chunking(model, rows), hooks:
        mlp(x)
    assert [t.data_ptr() for t in saved] == [x.data_ptr()]  # only the input is kept for the backward
    whole, pieces = peak_bytes(step(0)), peak_bytes(step(rows))
    row_bytes, piece_bytes = tokens * hidden * 4, rows * inter * 4
    assert whole > 3 * tokens * inter * 4  # gate, up and their product for every token
    assert pieces < 8 * row_bytes + 12 * piece_bytes, (pieces, row_bytes, piece_bytes)  # measured: 4 and 9.2
    assert pieces < whole / 4


def test_long_sequence_trains_as_unchunked_without_a_square_mask():
    """4,096 tokens on the CPU (SDPA, no padding): the layers get no attention mask, and one optimizer step with the
    MLP in pieces of 512 gives the loss, LoRA gradients and next loss of the unchunked model."""
    base = tiny(num_hidden_layers=1)
    ids = torch.randint(0, 256, (1, 4096), generator=torch.Generator().manual_seed(0))
    masks = []
    hook = decoder_layers(base)[0].register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    results = []
    for rows in (0, 512):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with mlp_chunking(model, rows):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.step()
            with torch.no_grad():
                after = model(input_ids=ids, labels=ids, use_cache=False).loss
        results.append((loss.detach(), grads, after))
    hook.remove()
    assert len(masks) == 4 and all(m is None for m in masks)  # causal SDPA: nothing grows as T x T
    (l0, g0, a0), (l1, g1, a1) = results
    torch.testing.assert_close(l1, l0, **TOL)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **TOL, msg=name)
    torch.testing.assert_close(a1, a0, **TOL)


@pytest.mark.parametrize("plan", ["full", "offload", "selective", ("offload", "none")])
def test_every_plan_with_the_mlp_in_pieces_equals_keeping_everything(plan):
    """Recomputation (of the layer by checkpointing, then of each piece) replays the same dropout masks."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = tiny(dropout=0.1)

    def loss_and_grads(m):
        torch.manual_seed(1)
        m.zero_grad(set_to_none=True)
        with mlp_chunking(m, 5):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    set_checkpointing(base, "none")
    loss0, grads0 = loss_and_grads(base)
    m = copy.deepcopy(base)
    set_checkpointing(m, plan)
    loss, grads = loss_and_grads(m)
    torch.testing.assert_close(loss, loss0, atol=0, rtol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-6, msg=f"{plan}: {name}")


def test_probe_measures_the_chunked_layer_and_extrapolates():
    """Above the MLP's piece size the probe runs the MLP in pieces: it saves the layer's activations without the MLP's
    intermediates (what a whole forward really saves per layer), linear in the length, plus one piece's workspace."""
    model = tiny(quantize=False)
    model.enable_input_require_grads()
    with mlp_chunking(model, 16):
        cost = measure_layer_cost(model, 1, 128)
        assert cost == measure_layer_cost(model, 1, 128, max_tokens=32)  # extrapolated from 16 and 32 tokens
        assert measure_layer_cost(model, 2, 128) == type(cost)(2 * cost.keep, 2 * cost.input, cost.workspace)
        plan = plan_memory(model, "speed", 1, 128, free_bytes=GIB, reserve_bytes=0)
        # what a whole forward saves: all layers kept minus all recomputed = layers x (keep - input) + rotary tables
        held = {}
        for mode in ("none", "full"):
            set_checkpointing(model, mode)
            skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
            saved = {}

            def pack(t, saved=saved, skip=skip):
                if t.untyped_storage().data_ptr() not in skip:
                    saved[t.untyped_storage().data_ptr()] = t
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=torch.zeros((1, 128), dtype=torch.long), use_cache=False)
            held[mode] = sum(t.untyped_storage().nbytes() for t in saved.values())
    tables = 2 * 128 * 16 * 4  # cos and sin [1, 128, head_dim 16] in float32
    assert held["none"] - held["full"] == 2 * (cost.keep - cost.input) + tables
    with mlp_chunking(model, 0):
        whole = _probe(model, 1, 16, None).keep
    with mlp_chunking(model, 8):
        split = _probe(model, 1, 16, None).keep
    assert cost.workspace == 2 * (whole - split) > 0  # one piece of 16 tokens: intermediates and their gradients
    assert plan.line.endswith(f"MLP in pieces: {cost.workspace / GIB:.2f} GiB for one piece's backward)")
    assert measure_layer_cost(model, 1, 128).workspace == 0  # the automatic rule: 128 tokens run whole


def test_chunked_probe_leaves_nothing_alive():
    """The probe of a chunked layer frees its graph too (the Function's context holds the RNG state and the MLP)."""
    import gc

    def tensors() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    model = tiny(quantize=False)
    before = tensors()
    with mlp_chunking(model, 8):
        assert measure_layer_cost(model, 1, 64, max_tokens=32).workspace > 0
    assert tensors() - before == set()


def test_automatic_piece_size():
    """Pieces of 512 MiB per [rows, intermediate] activation (a power of two, at least 1024 tokens), from more than
    one piece's worth of tokens: for the Llama-3-8B shape in bf16, pieces of 16,384 tokens above 16,384."""
    assert auto_chunk_rows(8 * 2048, 14336, 2) is None  # the benchmarked 8 x 2048 runs whole
    assert auto_chunk_rows(8 * 2048 + 1, 14336, 2) == 16384
    assert auto_chunk_rows(10**6, 2**20, 2) == 1024
    mlp = decoder_layers(tiny())[0].mlp
    assert mlp_chunk_rows(mlp, 10**9, torch.bfloat16) == auto_chunk_rows(10**9, 128, 2) == 1 << 21
    with pytest.raises(ValueError, match="mlp_chunking: rows must be >= 0 or None, got -1"):
        with mlp_chunking(mlp, -1):
            pass


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want||_F / ||want||_F in float32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def mlp_float32(mlp, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx) of a Llama MLP of LoRA-adapted linears in float32 from the same weights (dequantized exactly): the
    reference both bf16 runs are measured against."""
    from kbit.lora.layer import base_weight

    def linear(layer, t):
        w = base_weight(layer.base_layer, torch.float32)
        # detached: this reference must not add its gradients to the parameters' (it would change the compared ones)
        a, b = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float()
        return t @ w.t() + (t @ a.t()) @ b.t() * layer.scale

    x32 = x.detach().float().requires_grad_(True)
    y = linear(mlp.down_proj, F.silu(linear(mlp.gate_proj, x32)) * linear(mlp.up_proj, x32))
    y.backward(dy.float())
    return y.detach(), x32.grad


def test_float32_reference_of_the_mlp():
    """The reference the GPU test measures bf16 against is the MLP itself: in float32 on the CPU, to rounding."""
    model = tiny()
    x, dy = torch.randn(40, 64), torch.randn(40, 64)
    y0, dx0, _ = mlp_grads(model, x, dy, 0)
    y, dx = mlp_float32(decoder_layers(model)[0].mlp, x, dy)
    assert relative_error(y, y0) < 1e-6 and relative_error(dx, dx0) < 1e-6


@pytest.mark.gpu
def test_mlp_in_pieces_on_gpu_matches_and_holds_less():
    """bf16 on CUDA (NF4 dequant and SwiGLU as Triton kernels), the 8B MLP's width at 32,768 tokens in pieces of 8,192:
    values and gradients within bf16 rounding of the whole MLP, as close to a float32 reference as the whole MLP is,
    and the peak under half of the whole MLP's.

    Not element by element: cuBLAS picks other kernels for other row counts, so a few elements round differently
    and SwiGLU and the down projection amplify that (measured on an H100: 5,681 of 134M elements of y beyond
    bf16's elementwise tolerance, at most 0.05 apart). A wrong piece would be off by the size of y itself."""
    model = tiny(dtype=torch.bfloat16, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                 num_attention_heads=32, num_key_value_heads=8).cuda()  # fmt: skip
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 32768, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(1, 32768, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 1e-2
    peaks, results = {}, {}
    for rows in (0, 8192):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[rows] = mlp_grads(model, x, dy, rows)
        torch.cuda.synchronize()
        peaks[rows] = torch.cuda.max_memory_allocated() - base
    (y0, dx0, g0), (y1, dx1, g1) = results[0], results[8192]
    eps = 2**-8  # bf16's relative spacing
    assert relative_error(y1, y0) < eps and relative_error(dx1, dx0) < eps
    # Against float32: bf16 rounds the dequantized weights and every intermediate (a few 2^-9 in all, the same
    # roundings in both runs), so the pieces must be about as close as the whole MLP is.
    y_ref, dx_ref = mlp_float32(decoder_layers(model)[0].mlp, x, dy)
    for name, pieces, whole, ref in (("y", y1, y0, y_ref), ("dx", dx1, dx0, dx_ref)):
        err_pieces, err_whole = relative_error(pieces, ref), relative_error(whole, ref)
        assert err_whole < 4 * eps and err_pieces <= 1.5 * err_whole, (name, err_pieces, err_whole)
    for name in g0:
        rel = relative_error(g1[name], g0[name])
        assert rel < 1e-2, f"{name}: {rel:.4f}"
    assert peaks[8192] < peaks[0] / 2, peaks


def test_recomputed_layers_run_each_piece_once_per_pass():
    """Checkpointed ("full", "offload"), the layer's replay stops when the chunked MLP has saved its input, before any
    piece runs: each piece runs once in the forward and once in the MLP's backward, as a kept layer's do (the whole
    MLP runs in the forward and again in the replay). So pieces cost recomputed layers no extra MLP forward."""
    model = tiny()
    pieces = []  # tokens of every run of the MLP body (each runs the gate projection once), in order
    for layer in decoder_layers(model):
        layer.mlp.gate_proj.register_forward_pre_hook(lambda mod, args: pieces.append(args[0].shape[-2]))
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    counts = {}
    for plan in ("none", "full", "offload"):
        set_checkpointing(model, plan)
        for rows in (0, 16):
            pieces.clear()
            with mlp_chunking(model, rows):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                forward = len(pieces)
                loss.backward()
            counts[plan, rows] = (forward, len(pieces) - forward)
    assert counts[("none", 16)] == counts[("full", 16)] == counts[("offload", 16)] == (8, 8)  # 2 layers x 4 pieces
    assert counts[("none", 0)] == (2, 0) and counts[("full", 0)] == counts[("offload", 0)] == (2, 2)


def test_recompute_piece_size():
    """Recomputed layers: pieces of at most 256 MiB per [piece, intermediate] activation and at least two, each a
    power of two of at least 1024 tokens: for the 8B shape in bf16, 2 x 1024 at 1 x 2048, 2 x 8192 at 8 x 2048."""
    assert recompute_chunk_rows(2048, 14336, 2) == 1024
    assert recompute_chunk_rows(8 * 2048, 14336, 2) == 8192
    assert recompute_chunk_rows(4 * 2048, 14336, 2) == 4096
    assert recompute_chunk_rows(400_000, 14336, 2) == 8192
    assert recompute_chunk_rows(1500, 14336, 2) == 1024  # 1024 + 476
    assert recompute_chunk_rows(1024, 14336, 2) is None  # one piece: whole
    assert recompute_chunk_rows(10**6, 2**20, 2) == 1024


def test_plan_gives_recomputed_layers_pieces_and_trains_the_same_numbers():
    """plan_memory says which piece size the recomputed layers take; apply_plan gives it to their MLPs only (a forced
    size still wins; the probe still measures a kept layer); the step's loss and LoRA gradients equal keeping
    everything whole (no dropout: pieces draw their masks in another order than the whole MLP)."""
    base = tiny()
    ids = torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0))
    cost = measure_layer_cost(base, 1, 2048)
    plan = plan_memory(base, "memory", 1, 2048)
    assert plan.mlp_rows == 1024 and plan.line.startswith("memory plan: memory, all 2 layers recomputed")
    assert plan_memory(base, "selective", 1, 2048).mlp_rows is None  # selective caches every piece's matmuls
    assert plan_memory(base, "full", 1, 1024).mlp_rows is None  # one piece
    model = copy.deepcopy(base)
    mixed = MemoryPlan(("offload", "none"), "mixed", 1024)
    line = "activation checkpointing per layer: layer 0 offload, layer 1 none"
    assert apply_plan(model, mixed) == f"{line}; the MLP of 1 recomputed layer in pieces of 1024 tokens"
    first, last = (layer.mlp for layer in decoder_layers(model))
    assert mlp_chunk_rows(first, 2048, torch.float32) == 1024 and mlp_chunk_rows(last, 2048, torch.float32) is None
    assert mlp_chunk_rows(first, 2048, torch.float32, planned=False) is None  # the automatic rule: whole
    with mlp_chunking(model, 0):
        assert mlp_chunk_rows(first, 2048, torch.float32) is None
    assert measure_layer_cost(model, 1, 2048) == cost  # the probe measures the kept layer, not the plan's pieces
    results = {}
    for name, m in (("whole", base), ("pieces", model)):
        torch.manual_seed(1)
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["pieces"][0], results["whole"][0], **TOL)
    for name, g in results["whole"][1].items():
        torch.testing.assert_close(results["pieces"][1][name], g, **TOL, msg=name)
    kept = apply_plan(model, MemoryPlan(("none", "none"), "kept"))
    assert kept == "activation checkpointing: none (every decoder layer)"
    assert mlp_chunk_rows(first, 2048, torch.float32) is None  # a kept layer's automatic rule again


@pytest.mark.parametrize("quantize", [False, True])
def test_pieces_under_autocast_keep_the_whole_mlps_dtype(quantize):
    """float32 activations under bf16 autocast: an nn.Linear MLP returns bf16, a 4-bit one float32 (it computes in
    its input's dtype); the pieces return the same dtype and values, and the input gradient too."""
    model = tiny(quantize=quantize)
    mlp = decoder_layers(model)[0].mlp
    x = torch.randn(40, 64)
    out = {}
    for rows in (0, 16):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), mlp_chunking(model, rows):
            y = mlp(xr)
        y.float().square().sum().backward()
        out[rows] = (y.detach(), xr.grad)
    assert out[0][0].dtype == out[16][0].dtype == (torch.float32 if quantize else torch.bfloat16)
    torch.testing.assert_close(out[16][0], out[0][0], atol=0, rtol=0)
    torch.testing.assert_close(out[16][1], out[0][1], atol=1e-2, rtol=1e-2)  # bf16 matmuls in pieces


@pytest.mark.gpu
def test_chunked_probe_matches_cuda_memory():
    """With the MLP in pieces, the probe's keep bytes are what the CUDA allocator holds per layer after a forward
    (within 10%): flash attention's saves and the chunked MLP's input, nothing of the MLP's intermediates."""
    model = tiny(dtype=torch.bfloat16, num_hidden_layers=3).cuda()
    model.enable_input_require_grads()
    ids = torch.zeros((4, 1024), dtype=torch.long, device="cuda")
    with mlp_chunking(model, 512):
        cost = measure_layer_cost(model, 4, 1024)
        measured = kept_bytes_per_layer(model, ids, 3) + cost.input
    assert abs(measured - cost.keep) < 0.1 * cost.keep, (measured / GIB, cost)
    assert cost.workspace > 0


# ---- bench/train_step.py on the CPU ----

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


@pytest.fixture
def bench(monkeypatch):
    """bench/train_step.py as a module; kbit.estimate.PRESETS restored after (the bench adds its tiny preset)."""
    from kbit import estimate

    monkeypatch.setattr(estimate, "PRESETS", dict(estimate.PRESETS))
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("train_step_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_memory", None)


def test_bench_long_context_smoke(bench, capsys):
    """The long-context command's CPU shape: the plan line, tokens/s and host memory in the row, MLP in pieces."""
    rows = bench.main(["--device", "cpu", "--preset", "tiny", "--layers", "1", "--seq-len", "256", "--batches", "1",
                       "--modes", "fast-auto", "--steps", "1", "--warmup", "0", "--mlp-chunk", "64",
                       "--sdpa-backend", "flash"])  # fmt: skip
    out = capsys.readouterr().out
    assert "memory plan: all 1 layers kept (cpu: no GPU memory to plan)" in out
    (row,) = rows
    assert row["stack"] == "kbit fast-auto (0/1 recomputed)" and row["tokens_per_s"] > 0 and row["peak_rss_gib"] > 0
    assert "| kbit fast-auto (0/1 recomputed) | 1 |" in out


def test_bench_profile_smoke(bench, capsys):
    """--profile on the CPU: every class present, the classes add up to the step, the real work lands in its class."""
    rows = bench.main(["--device", "cpu", "--preset", "tiny", "--layers", "1", "--seq-len", "64", "--batches", "1",
                       "--modes", "fast-full", "--steps", "1", "--warmup", "0", "--profile"])  # fmt: skip
    prof = rows[0]["profile"]
    assert tuple(prof["ms"]) == bench.KERNEL_CLASSES
    assert sum(prof["ms"].values()) == pytest.approx(prof["wall_ms"], rel=0.05)
    for name in ("4-bit dequant", "bf16 matmul", "LoRA small matmuls", "attention", "fused norm/rope/swiglu",
                 "LM head + cross-entropy"):  # fmt: skip
        assert prof["ms"][name] > 0, name
    assert "| 4-bit dequant |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, ops, shapes, expected",
    [  # kernel names as an H100 trace shows them; ops innermost first
        ("_dequantize_4bit_kernel", ["DequantLinear"], [], "4-bit dequant"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", ["aten::mm", "aten::matmul"], [[16384, 4096], [4096, 14336]],
         "bf16 matmul"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", ["aten::mm"], [[16384, 4096], [4096, 16]], "LoRA small matmuls"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", ["aten::mm", "LinearCrossEntropyFunction"],
         [[1024, 4096], [4096, 128256]], "LM head + cross-entropy"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>",
         ["aten::_flash_attention_backward"], [], "attention"),
        ("void fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)",
         ["aten::_efficient_attention_forward"], [], "attention"),
        ("_swiglu_bwd_kernel", ["ChunkedMLPFunctionBackward"], [], "fused norm/rope/swiglu"),
        ("_rope_kernel", ["RotaryFunction"], [], "fused norm/rope/swiglu"),
        ("_ce_chunk_kernel", ["LinearCrossEntropyFunction"], [], "LM head + cross-entropy"),
        ("Memcpy DtoH (Device -> Pinned)", ["aten::copy_"], [], "copies/offload"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
         ["aten::add"], [], "other"),
    ],
)  # fmt: skip
def test_bench_kernel_classes(bench, name, ops, shapes, expected):
    assert bench.kernel_class(name, ops, shapes, vocab=128256) == expected
