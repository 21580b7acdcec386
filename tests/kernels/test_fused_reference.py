"""The fused training ops through their dispatch (the PyTorch reference on CPU) against the plain formulas.

Each op has a hand-written backward; these tests hold its values and gradients to autograd through the
unfused formula: in float64 to 1e-10 (only summation order differs), and in bfloat16 to equality where the op
promises transformers' rounding (SwiGLU, RoPE, the RMSNorm forward). The Triton kernels are compared with
this reference in test_fused_triton.py, which the last test here runs in Triton's CPU interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kbit.kernels import apply_rotary, linear_cross_entropy, rms_norm, swiglu

F64 = dict(atol=1e-10, rtol=1e-10)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _rand(*shape, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


# ---- RMSNorm ----


def plain_rms_norm(x, w, eps, offset, round_normed):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if round_normed:  # Llama: weight * hidden.to(input_dtype)
        return w * n.to(x.dtype)
    return (n * (1.0 + w.to(n.dtype)) if offset else n * w.to(n.dtype)).to(x.dtype)  # Gemma: (1 + w) in fp32


@pytest.mark.parametrize("offset, round_normed", [(0.0, True), (0.0, False), (1.0, False)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_matches_formula_float64(offset, round_normed, weight_grad):
    x, dy = _rand(3, 5, 96), _rand(3, 5, 96, seed=1, requires_grad=False)
    w = _rand(96, seed=2, requires_grad=weight_grad)
    inputs = [x, w] if weight_grad else [x]
    got = rms_norm(x, w, 1e-6, offset=offset, round_normed=round_normed)
    want = plain_rms_norm(x, w, 1e-6, offset, round_normed)
    torch.testing.assert_close(got, want, **F64)
    for a, b in zip(_grads(got, inputs, dy), _grads(want, inputs, dy), strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x, w = _rand(4, 32), _rand(32, seed=1, requires_grad=False)
    rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is None


def test_rms_norm_bfloat16_forward_equals_llama_and_gemma():
    x = _rand(64, 200, dtype=torch.bfloat16, requires_grad=False)
    w = _rand(200, dtype=torch.bfloat16, seed=1, requires_grad=False)
    # Llama rounds the normalised x before the weight, Gemma after (1 + w): same rounding, same bits.
    assert torch.equal(rms_norm(x, w, 1e-5, round_normed=True), plain_rms_norm(x, w, 1e-5, 0.0, True))
    assert torch.equal(rms_norm(x, w, 1e-5, offset=1.0), plain_rms_norm(x, w, 1e-5, 1.0, False))


def test_rms_norm_bfloat16_gradients_close():
    x = _rand(64, 200, dtype=torch.bfloat16)
    w = _rand(200, dtype=torch.bfloat16, seed=1)
    dy = _rand(64, 200, dtype=torch.bfloat16, seed=2, requires_grad=False)
    got = _grads(rms_norm(x, w, 1e-5, round_normed=True), [x, w], dy)
    want = _grads(plain_rms_norm(x, w, 1e-5, 0.0, True), [x, w], dy)
    # The fused backward sums in float32 and rounds once; autograd rounds each step to bf16 (2^-8 relative).
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="rms_norm: x has 8 features but the weight 4"):
        rms_norm(torch.ones(2, 8), torch.ones(4), 1e-6)


# ---- SwiGLU ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swiglu_matches_formula(dtype):
    gate_up = _rand(2, 5, 2 * 70, dtype=dtype)
    gate, up = gate_up.chunk(2, -1)  # strided views, as Phi3 passes them
    dout = _rand(2, 5, 70, dtype=dtype, seed=1, requires_grad=False)
    got, want = swiglu(gate, up), F.silu(gate) * up
    (g_got,), (g_want,) = _grads(got, [gate_up], dout), _grads(want, [gate_up], dout)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, **F64)
        torch.testing.assert_close(g_got, g_want, **F64)
    else:  # the fused op rounds where the unfused ops do: identical bits
        assert torch.equal(got, want) and torch.equal(g_got, g_want)


# ---- RoPE ----


def plain_rope(q, k, cos, sin):
    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1)

    c, s = cos[:, None], sin[:, None]
    return q * c + rot(q) * s, k * c + rot(k) * s


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("table_batch", [1, 2])
def test_rope_matches_formula(dtype, table_batch):
    # transformers' layout: [B, T, heads, D] projections viewed as [B, heads, T, D]
    q = _rand(2, 7, 4, 16, dtype=dtype).transpose(1, 2)
    k = _rand(2, 7, 2, 16, dtype=dtype, seed=1).transpose(1, 2)
    pos = torch.arange(7, dtype=torch.float64)[None].expand(table_batch, 7)
    freqs = pos[..., None] / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq = _rand(2, 4, 7, 16, dtype=dtype, seed=2, requires_grad=False)
    dk = _rand(2, 2, 7, 16, dtype=dtype, seed=3, requires_grad=False)
    got, want = apply_rotary(q, k, cos, sin), plain_rope(q, k, cos, sin)
    g_got = torch.autograd.grad(got, [q, k], [dq, dk])
    g_want = torch.autograd.grad(want, [q, k], [dq, dk])
    for a, b in zip((*got, *g_got), (*want, *g_want), strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, **F64)
        else:
            assert torch.equal(a, b)


def test_rope_rejects_trainable_tables():
    q = torch.ones(1, 1, 2, 4)
    with pytest.raises(ValueError, match="cos/sin must not require grad"):
        apply_rotary(q, q, torch.ones(1, 2, 4, requires_grad=True), torch.ones(1, 2, 4))


# ---- linear cross-entropy ----


def plain_ce(h, w, t, reduction, softcap):
    z = h @ w.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.flatten(0, -2), t.flatten(), ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("skip_ignored", [True, False])
def test_linear_cross_entropy_matches_formula_float64(reduction, softcap, skip_ignored):
    h, w = _rand(3, 11, 24), _rand(50, 24, seed=1)
    t = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(2))
    t[0, :4] = -100  # prompt tokens
    t[2, -1] = -100
    # chunk_rows=4 splits the 33 (or 28) rows unevenly: chunk boundaries must not matter
    got = linear_cross_entropy(h, w, t, reduction, softcap=softcap, chunk_rows=4, skip_ignored=skip_ignored)
    want = plain_ce(h, w, t, reduction, softcap)
    torch.testing.assert_close(got, want, **F64)
    g = torch.tensor(0.7, dtype=torch.float64)  # a non-unit incoming gradient (gradient accumulation's 1/k)
    for a, b in zip(_grads(got, [h, w], g), _grads(want, [h, w], g), strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_linear_cross_entropy_frozen_head_and_sum_equals_mean_times_count():
    h, w = _rand(20, 16), _rand(30, 16, seed=1, requires_grad=False)
    t = torch.randint(0, 30, (20,), generator=torch.Generator().manual_seed(2))
    t[::3] = -100
    total = linear_cross_entropy(h, w, t, "sum", chunk_rows=8)
    mean = linear_cross_entropy(h, w, t, "mean", chunk_rows=8)
    torch.testing.assert_close(total, mean * int((t != -100).sum()), **F64)
    total.backward()
    assert h.grad is not None and w.grad is None


def test_linear_cross_entropy_float32_matches_materialised_logits():
    h, w = _rand(64, 32, dtype=torch.float32), _rand(1000, 32, dtype=torch.float32, seed=1)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2))
    got, want = linear_cross_entropy(h, w, t), plain_ce(h, w, t, "mean", None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got, [h, w], None), _grads(want, [h, w], None), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_linear_cross_entropy_without_grad_and_bad_input():
    h, w = torch.randn(6, 8), torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, -100, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), plain_ce(h, w, t, "mean", None))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(h, w, t, "none")
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w, t[:5])


# ---- the Triton kernels, interpreted ----


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_fused_triton.py runs the kernels natively")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="test_fused_triton.py runs in this process")
def test_triton_kernels_in_interpreter():
    """test_fused_triton.py in Triton's CPU interpreter: the kernels' indexing, masking and math, not GPU speed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", KBIT_TRITON_TEST_DEVICE="cpu")
    path = Path(__file__).with_name("test_fused_triton.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
