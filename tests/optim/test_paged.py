"""Paged optimizers: the plain ones on CPU; chunk layouts (whole parameters packed, large ones cut) that cover
every block once; staging that moves every chunk in and out once; through Triton's interpreter, paged ==
reference through parameter-set changes. On a GPU: paged (2 or 3 staging sets, or mapped) == unpaged bit for
bit over many chunks and parameter-set changes, no host synchronisation inside a step, little state left on
the GPU, exact resumption, the kernel against the CPU reference.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from test_adamw8bit import grads_for, make_params, run  # tests/optim is on sys.path (pytest rootdir import)
from test_plan import NO_GRAD, extra_params, scripted_run

from kbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from kbit.optim import adamw8bit as mod
from kbit.optim.flat import BLOCK, TILE_BLOCKS, build_layout
from kbit.optim.staging import PagedStates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_8bit_is_the_plain_one_on_cpu(dtype):
    paged, plain = make_params(dtype), make_params(dtype)
    a, b = PagedAdamW8bit(paged, lr=1e-2), AdamW8bit(plain, lr=1e-2)
    run(a, paged, range(5))
    run(b, plain, range(5))
    for p, q in zip(paged, plain, strict=True):
        assert torch.equal(p, q)
        for k, v in b.state[q].items():
            assert torch.equal(torch.as_tensor(a.state[p][k]), torch.as_tensor(v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_adamw_is_torch_adamw_on_cpu(dtype):
    paged, plain = make_params(dtype), make_params(dtype)
    a, b = PagedAdamW(paged, lr=1e-2), torch.optim.AdamW(plain, lr=1e-2)
    run(a, paged, range(5))
    run(b, plain, range(5))
    for p, q in zip(paged, plain, strict=True):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.state[p][k], b.state[q][k])


def test_layout_chunks_cover_every_block_once():
    params = [torch.empty(n) for n in (5000, 256, 70_000, 1, 4096 * 5 + 3, 300, 2000)]
    layout = build_layout(params, torch.device("cpu"), chunk_blocks=16)
    assert layout.chunks[0].block0 == 0 and layout.chunks[-1].block1 == layout.nblocks
    for a, b in zip(layout.chunks, layout.chunks[1:], strict=False):
        assert a.tile1 == b.tile0 and a.block1 == b.block0
    assert layout.max_chunk_blocks <= 16
    # Regions tile the blocks; each is whole parameters packed up to the chunk size, or one larger parameter.
    starts = set(layout.first_block) | {layout.nblocks}
    assert [r[0] for r in layout.regions] + [layout.nblocks] == sorted(
        {r[0] for r in layout.regions} | {layout.nblocks}
    )
    for r, (b0, b1) in enumerate(layout.regions):
        assert b0 in starts and b1 in starts
        mine = [c for c in layout.chunks if c.region == r]
        assert mine[0].block0 == b0 and mine[-1].block1 == b1
        if len(mine) > 1:  # pieces of one parameter, cut at tile boundaries
            assert sum(b0 < f < b1 for f in layout.first_block) == 0
            assert all((c.block0 - b0) % TILE_BLOCKS == 0 for c in mine)
    # 20 blocks (two pieces), 1 + 0 packed, 274 blocks (69 tiles: 18 pieces of 3-4 tiles), 1, 81, 2 + 8 packed
    assert [sum(c.region == r for c in layout.chunks) for r in range(len(layout.regions))] == [2, 1, 18, 1, 6, 1]
    sizes = [c.block1 - c.block0 for c in layout.chunks if c.region == 2]
    assert max(sizes) - min(sizes) <= TILE_BLOCKS  # even pieces
    covered = torch.zeros(layout.nblocks, dtype=torch.int32)
    for i, b in layout.tiles.tolist():
        nb = -(-params[i].numel() // BLOCK)
        first = layout.first_block[i] + b
        covered[first : first + min(TILE_BLOCKS, nb - b)] += 1
    assert (covered == 1).all()


def test_paged_states_copy_every_chunk_in_and_out_once():
    # A launch that adds one to every state byte it is given: after a run every parameter's host state must
    # read one (each chunk staged, updated and written back exactly once, nothing lost between sections).
    params = [torch.empty(n) for n in (5000, 70_000, 256, 9000, 4096 * 9 + 3, 300)]
    specs = {"state1": (torch.uint8, True), "state2": (torch.uint8, True), "absmax1": (torch.float32, False)}
    for chunk_blocks, sets in ((64, 3), (40, 2), (10_000, 3)):
        paged = PagedStates(params, torch.device("cpu"), specs, chunk_blocks, sets)
        layout = paged.layout
        if chunk_blocks == 64:  # both kinds of chunk: whole parameters packed, and pieces of a large one
            whole = [c for c in layout.chunks if (c.block0, c.block1) == layout.regions[c.region]]
            assert len(whole) >= 2 and len(whole) < len(layout.chunks)
        seen = []

        def launch(states, chunk, seen=seen):
            assert len(states) == 3 and states[2].dtype == torch.float32
            assert states[0].numel() == (chunk.block1 - chunk.block0) * BLOCK == 256 * states[2].numel()
            for t in states:
                t.add_(1)
            seen.append(chunk)

        paged.run(launch)
        assert seen == layout.chunks
        for i, p in enumerate(params):
            for name in specs:
                view = paged.view(name, i)
                assert view.shape == (p.shape if name != "absmax1" else (-(-p.numel() // BLOCK),))
                assert (view == 1).all(), (chunk_blocks, name, i)
        assert paged.staging_bytes <= sets * (chunk_blocks + 3) * (2 * BLOCK + 4) + 3 * 512 * sets


# The fused path on CPU tensors through Triton's interpreter: flat buckets, kernel tables and the paged
# staging (PagedStates runs its copies in order on CPU) through a changing parameter set.
INTERPRETED = textwrap.dedent(
    """
    import torch
    import kbit.optim.paged as paged_mod
    from kbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
    from kbit.optim import adamw8bit as mod
    from tests.optim.test_adamw8bit import grads_for, make_params, run
    from tests.optim.test_plan import extra_params, scripted_run

    def ieee_sqrt(x):
        return x.double().sqrt().float()

    # Paged (chunks of whole parameters and pieces of large ones) against the reference with the kernel's sqrt;
    # the buckets are rebuilt when parameters gain gradients or a group is added. FlatStates (the unpaged
    # bucket) runs the same FusedUpdate code, and is checked in test_adamw8bit and on the GPU.
    dtype = torch.bfloat16
    sets = [(make_params(dtype), extra_params(dtype)) for _ in range(2)]
    opts = [PagedAdamW8bit(sets[0][0], lr=1e-2, weight_decay=0.1, chunk_blocks=24, staging_sets=3),
            AdamW8bit(sets[1][0], lr=1e-2, weight_decay=0.1)]
    opts[0]._fused = lambda p: True
    real = mod.adamw8bit_update_
    mod.adamw8bit_update_ = lambda *a: real(*a, sqrt=ieee_sqrt)
    for step in range(6):  # the set changes at steps 2 and 4 and holds at 1, 3 and 5
        for opt, (params, extra) in zip(opts, sets):
            scripted_run(opt, params, extra, step)
        paged, ref = (ps + ex for ps, ex in sets)
        for p, r in zip(paged, ref):
            assert torch.equal(p, r), (step, p.shape)
            for k, v in opts[1].state.get(r, {}).items():
                assert torch.equal(torch.as_tensor(opts[0].state[p][k]), torch.as_tensor(v)), (step, k, p.shape)
    layout = opts[0]._buckets[dtype].layout
    assert len(layout.chunks) > len(layout.regions) > 2  # whole-parameter chunks and pieces of large ones

    # PagedAdamW (moments in the parameter dtype) forced onto the fused path: chunks == one chunk, ~torch.
    paged_mod.use_triton = lambda t: True
    chunked, whole, plain = make_params(torch.float32), make_params(torch.float32), make_params(torch.float32)
    a = PagedAdamW(chunked, lr=1e-2, chunk_blocks=8, staging_sets=2)
    b = PagedAdamW(whole, lr=1e-2, chunk_blocks=10**6)
    c = torch.optim.AdamW(plain, lr=1e-2, foreach=False)
    for opt, ps in ((a, chunked), (b, whole), (c, plain)):
        run(opt, ps, range(2))
    assert len(a._buckets[torch.float32].layout.chunks) > 6 and len(b._buckets[torch.float32].layout.chunks) == 1
    for p, q, r in zip(chunked, whole, plain):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"]) and a.state[p]["step"] == 2
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    print("ok")
    """
)


@pytest.mark.slow
def test_fused_and_paged_updates_through_parameter_set_changes_interpreted():
    pytest.importorskip("triton", reason="the Triton interpreter needs the triton package (CUDA installs have it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------- GPU ---------------------------------------------------


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.double().sqrt().float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_cpu_reference(dtype, monkeypatch):
    gpu, cpu, ieee = make_params(dtype, "cuda"), make_params(dtype), make_params(dtype)
    opts = [AdamW8bit(ps, lr=1e-2, weight_decay=0.1) for ps in (gpu, cpu, ieee)]
    real = mod.adamw8bit_update_
    exact = 0
    for step in range(4):
        run(opts[0], gpu, range(step, step + 1))
        run(opts[1], cpu, range(step, step + 1))
        monkeypatch.setattr(mod, "adamw8bit_update_", lambda *a: real(*a, sqrt=ieee_sqrt))
        run(opts[2], ieee, range(step, step + 1))
        monkeypatch.setattr(mod, "adamw8bit_update_", real)
        for p, q, r in zip(gpu, cpu, ieee, strict=True):
            if p.numel() < 4096:  # float32 states: torch's CUDA ops, compared by tolerance below
                torch.testing.assert_close(p.cpu(), q, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
                continue
            a, b = opts[0].state[p], opts[1].state[q]
            for k in ("state1", "state2", "absmax1", "absmax2"):
                d = a[k].cpu().to(torch.float64) - b[k].to(torch.float64)
                # FMA / rounding differences move a code by one step, an absmax by an ulp (kernel docs)
                assert d.abs().max() <= (1 if k.startswith("state") else 2**-22 * b[k].abs().max()), k
            bound = (step + 1) * (1e-2 * 2.0**-20 + torch.finfo(dtype).eps * q.detach().abs())
            assert ((p.detach().cpu() - q).abs() <= bound).all()
            exact += int(
                torch.equal(p.detach().cpu(), r) and all(torch.equal(a[k].cpu(), b[k]) for k in b if k != "step")
            )
    print(f"GPU == IEEE-sqrt CPU reference exactly for {exact} of {4 * sum(p.numel() >= 4096 for p in gpu)} updates")


@pytest.mark.gpu
def test_gpu_kernel_is_exact_against_ieee_sqrt_reference(monkeypatch):
    gpu, ieee = make_params(torch.float32, "cuda"), make_params(torch.float32)
    a, b = AdamW8bit(gpu, lr=1e-2, weight_decay=0.1), AdamW8bit(ieee, lr=1e-2, weight_decay=0.1)
    real = mod.adamw8bit_update_
    monkeypatch.setattr(mod, "adamw8bit_update_", lambda *args: real(*args, sqrt=ieee_sqrt))
    run(a, gpu, range(3))
    run(b, ieee, range(3))
    for p, q in zip(gpu, ieee, strict=True):
        if p.numel() >= 4096:
            assert torch.equal(p.detach().cpu(), q)
            for k in ("state1", "state2", "absmax1", "absmax2"):
                assert torch.equal(a.state[p][k].cpu(), b.state[q][k]), k


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, pa: list, pb: list) -> None:
    torch.cuda.synchronize()  # paged host state is written by a side stream
    for p, q in zip(pa, pb, strict=True):
        assert torch.equal(p, q), tuple(p.shape)
        assert a.state.get(p, {}).keys() == b.state.get(q, {}).keys()
        for k, v in b.state.get(q, {}).items():
            assert torch.equal(torch.as_tensor(a.state[p][k]).cpu(), torch.as_tensor(v).cpu()), (k, tuple(p.shape))


def many_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """90 CUDA tensors of 4,096 to 40,000 elements, two of ~300,000 and a small one: with chunks of 64 blocks
    (16 Ki elements) these make chunks of several whole parameters, of one, and pieces of the large ones."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4096, 40_000, (90,), generator=gen).tolist() + [300_000, 1000, 300_001]
    return [torch.randn(n, generator=gen).to("cuda", dtype).requires_grad_() for n in sizes]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paged_equals_unpaged_bit_for_bit(dtype):
    paged, plain = make_params(dtype, "cuda"), make_params(dtype, "cuda")
    a, b = PagedAdamW8bit(paged, lr=1e-2, chunk_blocks=8), AdamW8bit(plain, lr=1e-2)
    run(a, paged, range(5))
    run(b, plain, range(5))
    assert len(a._buckets[dtype].layout.chunks) > 4
    assert_same_state(a, b, paged, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sets, transfer", [(2, "copy"), (3, "copy"), (None, "mapped")])
def test_gpu_paged_equals_unpaged_over_many_chunks(dtype, sets, transfer):
    paged, plain = many_params(dtype), many_params(dtype)
    a = PagedAdamW8bit(paged, lr=1e-2, weight_decay=0.1, chunk_blocks=64, staging_sets=sets, transfer=transfer)
    b = AdamW8bit(plain, lr=1e-2, weight_decay=0.1)
    for step in range(6):
        for i, (p, q, g) in enumerate(zip(paged, plain, grads_for(paged, step), strict=True)):
            vanish = step in (2, 3) and i % 7 == 0  # some gradients vanish for two steps, then come back
            p.grad = None if vanish else g.clone()
            q.grad = None if vanish else g.clone()
        a.step()
        b.step()
        assert_same_state(a, b, paged, plain)
    assert all(a.state[p]["state1"].is_pinned() for p in paged if p.numel() >= 4096)
    if transfer == "copy":
        layout = a._buckets[dtype].layout
        whole = sum((c.block0, c.block1) == layout.regions[c.region] for c in layout.chunks)
        assert len(layout.chunks) > 40 and 10 < whole < len(layout.chunks) - 8, (len(layout.chunks), whole)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paged_equals_unpaged_through_parameter_set_changes(dtype):
    # test_plan's script: gradients vanish and return, a param group is added, gradients are reused in place.
    runs = []
    for cls, kw in ((PagedAdamW8bit, dict(chunk_blocks=24)), (AdamW8bit, {})):
        params = make_params(dtype, "cuda")
        extra = [t.detach().cuda().requires_grad_() for t in extra_params(dtype)]
        opt = cls(params, lr=1e-2, weight_decay=0.1, **kw)
        runs.append((opt, params, extra))
    for step in range(len(NO_GRAD)):
        for opt, params, extra in runs:
            scripted_run(opt, params, extra, step)
        (a, pa, ea), (b, pb, eb) = runs
        assert_same_state(a, b, pa + ea, pb + eb)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make",
    [
        AdamW8bit,
        PagedAdamW8bit,
        PagedAdamW,
        partial(PagedAdamW8bit, transfer="mapped"),
        partial(PagedAdamW, transfer="mapped"),
    ],
    ids=["AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW8bit-mapped", "PagedAdamW-mapped"],
)
def test_gpu_step_never_synchronizes(make):
    # Once the parameter set is known, a step only enqueues work: no device-to-host read, no stream wait on
    # the host. Fresh gradient tensors each step (as zero_grad(set_to_none=True) gives) included.
    params = many_params(torch.bfloat16)
    opt = make(params, lr=1e-3)
    for step in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_paged_adamw_tracks_torch_adamw():
    paged, plain = make_params(torch.float32, "cuda"), make_params(torch.float32, "cuda")
    a, b = PagedAdamW(paged, lr=1e-2, chunk_blocks=8), torch.optim.AdamW(plain, lr=1e-2, foreach=False)
    run(a, paged, range(5))
    run(b, plain, range(5))
    torch.cuda.synchronize()  # the paged moments reach the host on a side stream
    for p, q in zip(paged, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # torch's CUDA ops round differently
        torch.testing.assert_close(a.state[p]["exp_avg"].cuda(), b.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paged_adamw_chunked_equals_mapped(dtype):
    chunked, mapped = many_params(dtype), many_params(dtype)
    a = PagedAdamW(chunked, lr=1e-2, chunk_blocks=64)
    b = PagedAdamW(mapped, lr=1e-2, transfer="mapped")
    for step in range(4):
        for p, q, g in zip(chunked, mapped, grads_for(chunked, step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert_same_state(a, b, chunked, mapped)


@pytest.mark.gpu
@pytest.mark.parametrize("transfer", ["copy", "mapped"])
def test_gpu_paged_state_stays_on_host(transfer):
    # 128 tensors of 256 Ki elements: 64 MiB of 8-bit state; the GPU may hold two chunks of 1/24 plus tables.
    params = [torch.zeros(1 << 18, device="cuda", requires_grad=True) for _ in range(128)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = PagedAdamW8bit(params, transfer=transfer)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    state_bytes = sum(2 * p.numel() + 8 * (-(-p.numel() // 256)) for p in params)
    assert held < 0.10 * state_bytes, (held, state_bytes)
    assert all(opt.state[p]["state1"].device.type == "cpu" and opt.state[p]["state1"].is_pinned() for p in params)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit, PagedAdamW])
def test_gpu_state_dict_resumes_bit_for_bit(cls):
    straight, resumed = make_params(torch.bfloat16, "cuda"), make_params(torch.bfloat16, "cuda")
    opt = cls(straight, lr=1e-2)
    run(opt, straight, range(6))
    first = cls(resumed, lr=1e-2)
    run(first, resumed, range(3))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = cls(resumed, lr=1e-2)
    second.load_state_dict(torch.load(buf, weights_only=True))
    run(second, resumed, range(3, 6))
    for p, q in zip(straight, resumed, strict=True):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_gpu_grad_none_params_are_skipped():
    params = make_params(torch.float32, "cuda")
    opt = AdamW8bit(params, lr=1e-2)
    run(opt, params, range(2))
    frozen = params[0].detach().clone()
    state = opt.state[params[0]]["state1"].clone()
    for p, g in zip(params, grads_for(params, 2), strict=True):
        p.grad = g
    params[0].grad = None
    opt.step()
    assert torch.equal(params[0].detach(), frozen) and torch.equal(opt.state[params[0]]["state1"], state)
    assert opt.state[params[0]]["step"] == 2 and opt.state[params[2]]["step"] == 3
