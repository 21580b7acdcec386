"""The fused training kernels (Triton) against their PyTorch references, forward and backward.

Small shapes cover the masking edges (widths that are not powers of two, partial tiles, strided views, ignored
targets, the soft-cap). float32 is held to float32 rounding; bfloat16 (GPU only: the interpreter's bf16 cast
truncates) to equality where the kernel rounds as the reference does, else to 2 bf16 ulps. The training-shape
tests (Llama-3-8B sizes, fresh random inputs, marked gpu) compare with the reference on the same GPU.

Run on a GPU, or in Triton's CPU interpreter with ``TRITON_INTERPRET=1 KBIT_TRITON_TEST_DEVICE=cpu`` (what
test_fused_reference.py does in CI; the training-shape tests are skipped there).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kbit.kernels import activation, loss, norm, rotary  # noqa: E402

DEV = os.environ.get("KBIT_TRITON_TEST_DEVICE", "cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and DEV == "cpu"
pytestmark = [] if INTERPRET else [pytest.mark.gpu]
gpu_only = pytest.mark.skipif(INTERPRET, reason="training shapes: too large for the interpreter")

if INTERPRET or torch.cuda.is_available():
    from kbit.kernels.triton import cross_entropy, rmsnorm, rope, swiglu

DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]
F32 = dict(atol=1e-5, rtol=1e-5)


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def close(actual, expected, what):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **F32, msg=what)
    else:  # 2 ulps of bf16 at the values' scale
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2 * 2**-8, msg=what)


# ---- RMSNorm ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, D", [(1, 64), (7, 100), (33, 128), (3, 1000)])
@pytest.mark.parametrize("offset, round_normed", [(0.0, True), (1.0, False)])
def test_rms_norm_kernel(dtype, rows, D, offset, round_normed):
    x, w, dy = rand(rows, D, dtype=dtype), rand(D, dtype=dtype, seed=1), rand(rows, D, dtype=dtype, seed=2)
    y, rstd = rmsnorm.rms_norm_forward(x, w, 1e-6, offset, round_normed, dtype)
    y_ref, rstd_ref = norm.rms_norm_forward_ref(x, w, 1e-6, offset, round_normed, dtype)
    close(y, y_ref, "y")
    torch.testing.assert_close(rstd, rstd_ref, **F32)
    wide = torch.full((rows, D + 24), 7.0, dtype=dtype, device=DEV)  # y as the first columns of a wider buffer
    rmsnorm.rms_norm_forward(x, w, 1e-6, offset, round_normed, dtype, out=wide[:, :D])
    # close, not equal: the row stride can change the tile's layout on a GPU, so the order of the row sum
    close(wide[:, :D], y_ref, "y into strided rows")
    assert bool((wide[:, D:] == 7).all())
    dx, dw = rmsnorm.rms_norm_backward(dy, x, w, rstd, offset, round_normed, True)
    dx_ref, dw_ref = norm.rms_norm_backward_ref(dy, x, w, rstd_ref, offset, round_normed, True)
    close(dx, dx_ref, "dx")
    close(dw.float() / rows, dw_ref.float() / rows, "dweight")  # a sum over rows: compare the mean
    dx2, none = rmsnorm.rms_norm_backward(dy, x, w, rstd, offset, round_normed, False)
    assert none is None and torch.equal(dx2, dx)
    wide = torch.cat([dy, rand(rows, 24, dtype=dtype, seed=3)], dim=1)  # dy as the first columns of a wider buffer
    dx3, _ = rmsnorm.rms_norm_backward(wide[:, :D], x, w, rstd, offset, round_normed, False)
    close(dx3, dx_ref, "dx from strided dy")


# ---- SwiGLU ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 8), (5, 300), (3, 2100)])
def test_swiglu_kernel(dtype, rows, width):
    gate_up = rand(rows, 2 * width, dtype=dtype, scale=3.0)
    gate, up = gate_up.chunk(2, -1)  # row stride 2 * width, as Phi3's fused projection gives them
    dout = rand(rows, width, dtype=dtype, seed=1)
    close(swiglu.swiglu_forward(gate, up), activation.swiglu_forward_ref(gate, up), "out")
    got, want = swiglu.swiglu_backward(dout, gate, up), activation.swiglu_backward_ref(dout, gate, up)
    for a, b, what in zip(got, want, ("d_gate", "d_up"), strict=True):
        close(a, b, what)


# ---- RoPE ----


def tables(batch, T, D, dtype):
    pos = torch.arange(T, dtype=torch.float32)[None].expand(batch, T)
    freqs = pos[..., None] / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, T, D, table_batch", [(1, 1, 1, 8, 1), (2, 5, 9, 16, 2), (2, 3, 4, 96, 1)])
@pytest.mark.parametrize("backward", [False, True])
def test_rope_kernel(dtype, B, H, T, D, table_batch, backward):
    x = rand(B, T, H, D, dtype=dtype).transpose(1, 2)  # transformers' strided [B, H, T, D] view
    cos, sin = tables(table_batch, T, D, dtype)
    out = rope.rope_apply(x, cos, sin, backward)
    close(out, rotary.rope_apply_ref(x, cos, sin, backward), "rotated")
    assert out.stride() == x.stride()  # the layout transformers' attention expects, no copy


# ---- cross-entropy chunk ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [10, 1000, 5000])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_cross_entropy_chunk_kernel(dtype, V, softcap):
    C = 6
    logits = rand(C, V, dtype=dtype, scale=4.0)
    targets = torch.tensor([0, V - 1, -100, 3 % V, -100, V // 2], device=DEV)
    scale = torch.rand(C, generator=torch.Generator().manual_seed(3)).to(DEV)
    got_logits, ref_logits = logits.clone(), logits.clone()
    got = cross_entropy.ce_chunk(got_logits, targets, scale, softcap, -100)
    want = loss.ce_chunk_ref(ref_logits, targets, scale, softcap, -100)
    torch.testing.assert_close(got, want.float(), **F32)
    close(got_logits, ref_logits, "gradient")
    assert torch.equal(got_logits[2], torch.zeros_like(got_logits[2]))  # ignored rows get no gradient
    no_grad = logits.clone()
    torch.testing.assert_close(cross_entropy.ce_chunk(no_grad, targets, None, softcap, -100), got)
    assert torch.equal(no_grad, logits)  # without a scale the logits are left alone


# ---- training shapes (GPU) ----


@gpu_only
def test_rms_norm_training_shape():
    x = rand(2 * 2048, 4096, dtype=torch.bfloat16, seed=10).requires_grad_()
    w = (1 + 0.1 * rand(4096, seed=11)).to(torch.bfloat16).requires_grad_()
    dy = rand(2 * 2048, 4096, dtype=torch.bfloat16, seed=12)
    y = norm.rms_norm(x, w, 1e-5, round_normed=True)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = wr * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5))
    gxr, gwr = torch.autograd.grad(yr, [xr, wr], dy.float())
    close(y, yr, "y")
    close(gx, gxr, "dx")
    torch.testing.assert_close(gw.float(), gwr, atol=1.0, rtol=1e-2)  # a bf16 sum of 4096 rows


@gpu_only
def test_swiglu_training_shape():
    gate = rand(4096, 14336, dtype=torch.bfloat16, seed=20).requires_grad_()
    up = rand(4096, 14336, dtype=torch.bfloat16, seed=21).requires_grad_()
    dout = rand(4096, 14336, dtype=torch.bfloat16, seed=22)
    out = activation.swiglu(gate, up)
    got = torch.autograd.grad(out, [gate, up], dout)
    ref = F.silu(gate) * up
    want = torch.autograd.grad(ref, [gate, up], dout)
    # Same rounding points as the unfused ops, but Triton's exp is not CUDA's expf: a value can land on the
    # other side of a bf16 rounding boundary, so 2 ulps rather than equality.
    close(out, ref, "out")
    for a, b in zip(got, want, strict=True):
        close(a, b, "grad")


@gpu_only
def test_rope_training_shape():
    q = rand(2, 2048, 32, 128, dtype=torch.bfloat16, seed=30).transpose(1, 2).requires_grad_()
    k = rand(2, 2048, 8, 128, dtype=torch.bfloat16, seed=31).transpose(1, 2).requires_grad_()
    cos, sin = tables(2, 2048, 128, torch.bfloat16)
    dq, dk = rand(2, 32, 2048, 128, dtype=torch.bfloat16, seed=32), rand(2, 8, 2048, 128, dtype=torch.bfloat16)
    got = rotary.apply_rotary(q, k, cos, sin)
    got_g = torch.autograd.grad(got, [q, k], [dq, dk])

    def rot(x):
        return torch.cat([-x[..., 64:], x[..., :64]], -1)

    ref = (q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None])
    ref_g = torch.autograd.grad(ref, [q, k], [dq, dk])
    for a, b in zip((*got, *got_g), (*ref, *ref_g), strict=True):
        close(a, b, "rope")


@gpu_only
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_linear_cross_entropy_training_shape(softcap):
    """4,096 tokens through Llama-3's 128,256-entry head in bf16: loss and gradients as materialised logits."""
    h = rand(4096, 4096, dtype=torch.bfloat16, seed=40).requires_grad_()
    w = (0.02 * rand(128256, 4096, seed=41)).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 128256, (4096,), generator=torch.Generator().manual_seed(42)).to(DEV)
    t[:1000] = -100
    got = loss.linear_cross_entropy(h, w, t, softcap=softcap)
    got_g = torch.autograd.grad(got, [h, w])
    z = (h @ w.T).float()  # bf16 logits, as transformers' head makes them, then float32
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, t, ignore_index=-100)
    ref_g = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_g, ref_g, strict=True):
        # Element-wise bounds fail on gradients of ~1e-6 that bf16 rounds differently; the relative norm is the test.
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, err
