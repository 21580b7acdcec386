"""Paged optimizers: the plain ones on CPU, chunked layouts equal to one-chunk ones, and on a GPU: paged ==
unpaged bit for bit, little state left on the GPU, exact resumption, the kernel against the CPU reference.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_adamw8bit import grads_for, make_params, run  # tests/optim is on sys.path (pytest rootdir import)

from kbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from kbit.optim import adamw8bit as mod
from kbit.optim.flat import BLOCK, TILE_BLOCKS, build_layout


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
    params = [torch.empty(n) for n in (5000, 256, 70_000, 1, 4096 * 5 + 3)]
    layout = build_layout(params, torch.device("cpu"), chunk_blocks=16)
    assert layout.chunks[0].block0 == 0 and layout.chunks[-1].block1 == layout.nblocks
    for a, b in zip(layout.chunks, layout.chunks[1:], strict=False):
        assert a.tile1 == b.tile0 and a.block1 == b.block0
    assert layout.max_chunk_blocks <= 16 + TILE_BLOCKS - 1
    covered = torch.zeros(layout.nblocks, dtype=torch.int32)
    for i, b in layout.tiles.tolist():
        nb = -(-params[i].numel() // BLOCK)
        first = layout.first_block[i] + b
        covered[first : first + min(TILE_BLOCKS, nb - b)] += 1
    assert (covered == 1).all()


# Chunked flat states with staging copies on CPU (what PagedStates does with streams), through the
# interpreter.
INTERPRETED = textwrap.dedent(
    """
    import torch
    from kbit.optim import AdamW8bit
    from kbit.optim.adamw8bit import STATE8_SPECS
    from kbit.optim.flat import BLOCK, FlatStates, build_layout
    from tests.optim.test_adamw8bit import make_params, run

    class StagedStates:
        def __init__(self, params, device, specs):
            self.flat = FlatStates(build_layout(params, device, chunk_blocks=5), specs, device)
        def run(self, launch):
            for chunk in self.flat.layout.chunks:
                spans = {n: (chunk.block0 * (BLOCK if e else 1), chunk.block1 * (BLOCK if e else 1))
                         for n, e in self.flat.per_element.items()}
                staging = {n: buf[slice(*spans[n])].clone() for n, buf in self.flat.buffers.items()}
                launch(staging, chunk)
                for n, buf in self.flat.buffers.items():
                    buf[slice(*spans[n])] = staging[n]
        def synchronize(self):
            pass

    for dtype in (torch.bfloat16,):
        chunked, whole = make_params(dtype), make_params(dtype)
        a, b = AdamW8bit(chunked, lr=1e-2), AdamW8bit(whole, lr=1e-2)
        a._fused = b._fused = lambda p: True
        a._new_bucket = lambda ps, dev: StagedStates(ps, dev, STATE8_SPECS)
        run(a, chunked, range(2))
        run(b, whole, range(2))
        assert len(a._buckets[dtype].flat.layout.chunks) > 5
        for p, q in zip(chunked, whole):
            assert torch.equal(p, q)
            for k, v in b.state[q].items():
                assert torch.equal(torch.as_tensor(a.state[p][k]), torch.as_tensor(v)), k
    print("ok")
    """
)


@pytest.mark.slow
def test_chunked_fused_update_equals_one_chunk_interpreted():
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paged_equals_unpaged_bit_for_bit(dtype):
    paged, plain = make_params(dtype, "cuda"), make_params(dtype, "cuda")
    a, b = PagedAdamW8bit(paged, lr=1e-2, chunk_blocks=8), AdamW8bit(plain, lr=1e-2)
    run(a, paged, range(5))
    run(b, plain, range(5))
    assert len(a._buckets[dtype].flat.layout.chunks) > 4
    for p, q in zip(paged, plain, strict=True):
        assert torch.equal(p, q)
        for k, v in b.state[q].items():
            assert torch.equal(torch.as_tensor(a.state[p][k]).cpu(), torch.as_tensor(v).cpu()), k


@pytest.mark.gpu
def test_gpu_paged_adamw_tracks_torch_adamw():
    paged, plain = make_params(torch.float32, "cuda"), make_params(torch.float32, "cuda")
    a, b = PagedAdamW(paged, lr=1e-2, chunk_blocks=8), torch.optim.AdamW(plain, lr=1e-2, foreach=False)
    run(a, paged, range(5))
    run(b, plain, range(5))
    for p, q in zip(paged, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # torch's CUDA ops round differently
        torch.testing.assert_close(a.state[p]["exp_avg"].cuda(), b.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_gpu_paged_state_stays_on_host():
    # 128 tensors of 256 Ki elements: 64 MiB of 8-bit state; the GPU may hold two chunks of 1/32 plus tables.
    params = [torch.zeros(1 << 18, device="cuda", requires_grad=True) for _ in range(128)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = PagedAdamW8bit(params)
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
