"""The memory plan: every per-layer mix of none / full / offload / selective trains the same numbers (offloading
as many inputs as it says), the probe measures what autograd saves, and the chooser picks the fastest plan that fits
the memory it is given. The offload mechanics themselves: test_offload.py."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from kbit_testing import kept_bytes_per_layer, tiny_llama

from kbit.lora import add_lora, lora_layers
from kbit.models.checkpointing import decoder_layers, set_checkpointing
from kbit.models.memory_plan import (
    GIB,
    MARGIN_BYTES,
    PLAN_MODES,
    WEIGHT_PIECE_BYTES,
    LayerCost,
    apply_plan,
    choose_plan,
    measure_layer_cost,
    memory_loss_rows,
    needed_bytes,
    plan_memory,
    weight_piece_rows,
)
from kbit.models.offload import Offloader, SavedInput
from kbit.models.patch import LOSS_CHUNK_ATTR, apply_fast_path, mlp_chunking
from kbit.nn import Linear4bit

PLANS = [
    "none",
    "full",
    "offload",
    "selective",
    ("offload", "full", "none"),
    ("none", "offload", "selective"),
    ("full", "offload", "offload"),
]


def model(fast: bool, device: str = "cpu", dtype: torch.dtype = torch.float32, dropout: float = 0.1):
    """A 3-layer tiny Llama, one 4-bit projection, LoRA r=4 with dropout (recomputation must replay its masks)."""
    m = tiny_llama(num_hidden_layers=3).to(device, dtype)
    m.model.layers[1].mlp.down_proj = Linear4bit.from_linear(m.model.layers[1].mlp.down_proj, dtype)
    add_lora(m, r=4, alpha=8, dropout=dropout, dtype=dtype)
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_B.weight.normal_(0, 0.1)
    if fast:
        apply_fast_path(m)
    return m.train()


def host_inputs(m) -> list[SavedInput]:
    """The layer inputs an offloading model holds in host memory now (its Offloader's chain, forward order)."""
    funcs = [layer._gradient_checkpointing_func for layer in decoder_layers(m)]
    offloader = next((f.__self__ for f in funcs if isinstance(getattr(f, "__self__", None), Offloader)), None)
    return offloader.saved() if offloader else []


def loss_and_grads(m, ids):
    """(loss, LoRA gradients, layer inputs held in host memory between the forward and the backward)."""
    torch.manual_seed(1)  # the same dropout masks in every run
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, labels=ids, use_cache=False).loss
    offloaded = len(host_inputs(m))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, offloaded


@pytest.mark.parametrize("fast", [False, True])
def test_every_plan_gives_the_losses_and_gradients_of_no_checkpointing(fast):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = model(fast)
    set_checkpointing(base, "none")
    loss0, grads0, _ = loss_and_grads(base, ids)
    assert len(grads0) == 3 * 7 * 2
    for plan in PLANS:
        m = copy.deepcopy(base)
        set_checkpointing(m, plan)
        modes = [plan] * 3 if isinstance(plan, str) else list(plan)
        assert [layer.gradient_checkpointing for layer in decoder_layers(m)] == [x != "none" for x in modes]
        loss, grads, offloaded = loss_and_grads(m, ids)
        assert offloaded == modes.count("offload")
        # fp32 on the CPU: recomputation replays the same ops on the same inputs (the offloaded copy is exact)
        torch.testing.assert_close(loss, loss0, atol=0, rtol=0, msg=str(plan))
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-6, msg=f"{plan}: {name}")


@pytest.mark.parametrize("fast", [False, True])
def test_probe_counts_what_a_whole_forward_saves_per_layer(fast):
    """All layers kept minus all recomputed = layers x (keep - input), plus the rotary tables (saved once, shared)."""
    m = model(fast)
    m.enable_input_require_grads()  # layer 0's input carries grad as in the probe (and as layers 1.. do)
    ids = torch.zeros((2, 16), dtype=torch.long)

    def saved_bytes(plan):
        set_checkpointing(m, plan)
        skip = {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, use_cache=False)
        return sum(t.untyped_storage().nbytes() for t in saved.values())

    cost = measure_layer_cost(m, 2, 16)
    assert cost.input == 2 * 16 * 64 * 4  # fp32 hidden states
    cos, sin = m.model.rotary_emb(torch.zeros(1), torch.arange(16)[None])
    tables = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
    assert saved_bytes("none") - saved_bytes("full") == 3 * (cost.keep - cost.input) + tables
    assert measure_layer_cost(m, 4, 16) == LayerCost(2 * cost.keep, 2 * cost.input)  # linear in the batch
    assert all(layer.gradient_checkpointing for layer in decoder_layers(m))  # the probe restored "full"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager saves T x T scores: the quadratic term
def test_long_batches_are_extrapolated_from_two_short_probes(attention):
    m = model(False)
    m.config._attn_implementation = attention
    assert measure_layer_cost(m, 3, 64, max_tokens=32) == measure_layer_cost(m, 3, 64)


def test_chooser_keeps_the_last_layers_then_recomputes_then_offloads():
    cost = LayerCost(keep=10, input=1)
    # kept k of 4: max(k, 1) x 10 + (4 - k) x 1, + 10 of backward temporaries (+ 1 prefetched input if offloading)
    assert needed_bytes(("none",) * 4, cost) == 50
    assert needed_bytes(("full", "none", "none", "none"), cost) == 41
    assert needed_bytes(("full",) * 4, cost) == 24
    assert needed_bytes(("offload", "offload", "offload", "full"), cost) == 22
    assert choose_plan(4, cost, 100) == (("none",) * 4, True)
    assert choose_plan(4, cost, 41) == (("full", "none", "none", "none"), True)
    assert choose_plan(4, cost, 40) == (("full", "full", "none", "none"), True)
    assert choose_plan(4, cost, 23) == (("full", "full", "full", "none"), True)  # keeping one costs no more
    assert choose_plan(4, cost, 22) == (("offload", "offload", "offload", "full"), True)
    assert choose_plan(4, cost, 21) == (("offload",) * 4, True)
    assert choose_plan(4, cost, 20) == (("offload",) * 4, False)


def test_plan_memory_speed_from_given_free_memory():
    m = model(False)
    cost = measure_layer_cost(m, 2, 16)
    target = ("full", "none", "none")
    free = MARGIN_BYTES + 7 + needed_bytes(target, cost)  # the margin is MARGIN_BYTES at this size
    plan = plan_memory(m, "speed", 2, 16, free_bytes=free + 1000, reserve_bytes=1000)
    assert plan.modes == target
    assert plan.line.startswith("memory plan: 2 layers kept, 1 layer recomputed (free 0.5 GiB, 0.0 GiB reserved")
    plan = plan_memory(m, "speed", 2, 16, free_bytes=MARGIN_BYTES + needed_bytes(("offload",) * 3, cost))
    assert plan.modes == ("offload",) * 3 and "3 layers recomputed from CPU-offloaded inputs" in plan.line
    plan = plan_memory(m, "speed", 2, 16, free_bytes=MARGIN_BYTES)
    assert plan.modes == ("offload",) * 3 and "does not fit" in plan.line
    assert plan_memory(m, "speed", 2, 16).modes == ("none",) * 3  # a CPU model, no free memory given: keep all
    assert plan_memory(m, "memory", 2, 16).modes == ("offload",) * 3
    assert plan_memory(m, "selective", 2, 16).line == "memory plan: selective on all 3 layers, as configured"
    assert set(PLAN_MODES) == {"speed", "memory", "full", "none", "selective", "offload"}
    with pytest.raises(ValueError, match="memory plan must be one of speed, memory, full, selective, offload, none"):
        plan_memory(m, "fast", 2, 16)


def test_memory_plan_runs_the_loss_in_smaller_chunks_with_the_same_result():
    assert [memory_loss_rows(t) for t in (16, 2048, 3000, 8 * 2048)] == [256, 256, 256, 2048]
    ids = torch.randint(0, 256, (2, 1024), generator=torch.Generator().manual_seed(0))
    base = model(True, dropout=0.0)
    set_checkpointing(base, "none")
    loss0, grads0, _ = loss_and_grads(base, ids)
    m = copy.deepcopy(base)
    plan = plan_memory(m, "memory", 2, 1024)
    assert plan.loss_rows == 256 and plan_memory(model(False), "memory", 2, 1024).loss_rows is None  # unpatched
    assert apply_plan(m, plan).endswith("; the loss in chunks of at most 256 tokens")
    calls = []
    hook = torch.nn.functional.linear
    head = m.lm_head.weight
    try:  # the rows of each LM-head matmul the loss makes
        torch.nn.functional.linear = lambda x, w, b=None: (w is head and calls.append(x.shape[0])) or hook(x, w, b)
        loss, grads, _ = loss_and_grads(m, ids)
    finally:
        torch.nn.functional.linear = hook
    assert calls == [256] * 7 + [254]  # 2 x 1024 tokens less the last of each sequence (no target)
    torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    apply_plan(m, plan_memory(m, "full", 2, 1024))  # another plan gives the default chunks back
    assert getattr(m, LOSS_CHUNK_ATTR) is None


def test_memory_plan_rebuilds_large_weights_in_row_pieces_with_the_same_result():
    with torch.device("meta"):  # the Llama-3-8B MLP's shapes, nothing allocated
        down, q = Linear4bit(14336, 4096), Linear4bit(4096, 4096)
    assert weight_piece_rows(down, WEIGHT_PIECE_BYTES) == 1168  # 32 MiB of bf16 rows of 14336, in 16s
    assert weight_piece_rows(q, WEIGHT_PIECE_BYTES) is None  # 32 MiB whole
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = model(True, dropout=0.0)
    set_checkpointing(base, "none")
    loss0, grads0, _ = loss_and_grads(base, ids)
    m = copy.deepcopy(base)
    down = m.model.layers[1].mlp.down_proj.base_layer
    plan = plan_memory(m, "memory", 2, 16, weight_pieces=True)
    assert plan.weight_piece_bytes == WEIGHT_PIECE_BYTES
    assert plan_memory(m, "memory", 2, 16).weight_piece_bytes is None  # eager steps: whole weights (fewer launches)
    assert plan_memory(m, "full", 2, 16, weight_pieces=True).weight_piece_bytes is None
    small = dataclasses.replace(plan, weight_piece_bytes=16 * down.in_features * 4)  # 16 float32 rows a piece
    assert apply_plan(m, small).endswith("; 1 weight over 0 MiB dequantized in row pieces of that size")
    assert down.dequant_rows == 16 and down.out_features == 64
    loss, grads, _ = loss_and_grads(m, ids)
    torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    apply_plan(m, plan_memory(m, "full", 2, 16))  # another plan rebuilds whole weights again
    assert down.dequant_rows is None


def test_plan_length_and_modes_are_checked():
    m = model(False)
    with pytest.raises(ValueError, match="checkpointing: the plan has 2 modes for 3 decoder layers"):
        set_checkpointing(m, ("none", "full"))
    with pytest.raises(ValueError, match="checkpointing mode must be one of .*, got 'half'"):
        set_checkpointing(m, ("none", "full", "half"))


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True])
def test_plans_agree_on_gpu_and_offload_holds_less(fast):
    """bf16 on CUDA (Triton kernels with the fast path): each plan's loss and LoRA gradients match no
    checkpointing, and after the forward an offloaded model holds its layer inputs in host memory, not on the GPU."""
    ids = torch.randint(0, 256, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    base = model(fast, "cuda", torch.bfloat16)
    set_checkpointing(base, "none")
    loss0, grads0, _ = loss_and_grads(base, ids)
    held, alive = {}, {}
    for plan in PLANS:
        m = copy.deepcopy(base)
        set_checkpointing(m, plan)
        loss, grads, offloaded = loss_and_grads(m, ids)
        assert offloaded == (3 if plan == "offload" else 0 if isinstance(plan, str) else plan.count("offload"))
        torch.testing.assert_close(loss, loss0, atol=1e-3, rtol=1e-3, msg=str(plan))
        for name, g in grads0.items():  # recomputation replays the same kernels on the same inputs
            rel = (grads[name].float() - g.float()).norm() / g.float().norm()
            assert rel < 1e-2, f"{plan}: {name} differs by {rel:.4f}"
        if plan in ("full", "offload"):
            inputs = []  # each decoder layer's input, weakly: alive after the forward only if the GPU still holds it
            hooks = [
                layer.register_forward_pre_hook(
                    lambda mod, a, kw, seen=inputs: seen.append(weakref.ref(a[0] if a else kw["hidden_states"])),
                    with_kwargs=True,
                )
                for layer in m.model.layers
            ]
            # Garbage from earlier tests must not be collected inside the measured window: collect it first, then
            # keep the collector off until the count is read.
            gc.collect()
            gc.disable()
            try:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                out = m(input_ids=ids, labels=ids, use_cache=False)
                torch.cuda.synchronize()
                torch.empty(1, device="cuda")  # an allocation retires the freed inputs whose copies have finished
                held[plan] = torch.cuda.memory_allocated() - before
            finally:
                gc.enable()
            alive[plan] = [r() is not None for r in inputs]
            out.loss.backward()
            del out
            for h in hooks:
                h.remove()
    assert alive == {"full": [True] * 3, "offload": [False] * 3}, alive  # offloaded inputs live in host memory only
    assert held["offload"] < held["full"], held


@pytest.mark.gpu
def test_probe_matches_cuda_memory():
    """The probe's keep bytes are what the CUDA allocator holds after a layer's forward (within 10%)."""
    m = model(True, "cuda", torch.bfloat16)
    m.enable_input_require_grads()  # layer 0 saves as much as the others (and as the probe's layer)
    cost = measure_layer_cost(m, 4, 1024)
    ids = torch.zeros((4, 1024), dtype=torch.long, device="cuda")
    measured = kept_bytes_per_layer(m, ids, 3) + cost.input
    assert abs(measured - cost.keep) < 0.1 * cost.keep, (measured / GIB, cost)


@pytest.mark.gpu
def test_memory_plan_runs_the_mlp_in_pieces_and_holds_less_on_gpu():
    """bf16 on CUDA (Triton kernels, 4-bit MLP projections), the 8B MLP's proportions (hidden 1024, MLP 3584) at
    4 x 2048 tokens: the memory plan (every layer offloaded, the MLP in two pieces of 4096) trains the loss and LoRA
    gradients of the same plan with the MLP whole, and peaks lower by at least one piece's intermediates."""
    m = tiny_llama(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                   vocab_size=1024).to("cuda", torch.bfloat16)  # fmt: skip
    for layer in m.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Linear4bit.from_linear(getattr(layer.mlp, name), torch.bfloat16))
    add_lora(m, r=16, alpha=32, dropout=0.0, dtype=torch.bfloat16)
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_B.weight.normal_(0, 0.01)
    apply_fast_path(m)
    m.train()
    plan = plan_memory(m, "memory", 4, 2048)
    assert plan.mlp_rows == 4096
    apply_plan(m, plan)
    ids = torch.randint(0, 1024, (4, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results, peaks = {}, {}
    for name, rows in (("whole", 0), ("pieces", None)):  # None: the plan's pieces
        with mlp_chunking(m, rows):
            for _ in range(2):  # the second step: host buffers and workspaces made by the first
                m.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                loss = m(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["pieces"][0], results["whole"][0], atol=1e-3, rtol=1e-3)
    for name, g in results["whole"][1].items():
        rel = (results["pieces"][1][name].float() - g.float()).norm() / g.float().norm()
        assert rel < 1e-2, f"{name} differs by {rel:.4f}"
    piece = 3 * 4096 * 3584 * 2  # gate, up and their product for one piece, bf16
    assert peaks["pieces"] <= peaks["whole"] - piece, peaks


def test_probe_leaves_nothing_alive():
    """The probe's graph is freed: a saved op output handed back to its node would be a C++ cycle the collector
    never frees (on the 8B shape at 8 x 2048 it leaked about 3 GiB of one layer's activations)."""

    def tensors() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    m = model(True)
    before = tensors()
    cost = measure_layer_cost(m, 2, 64)
    assert cost.keep > 0
    assert tensors() - before == set()
