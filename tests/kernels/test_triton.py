"""Triton kernels vs the PyTorch reference: bytes, scales, nested statistics and values must be identical.

Every output is poisoned before a kernel writes it (``torch.empty`` returns NaN / 0xAB here), so an element
the kernel misses cannot pass by luck. The reference always runs on CPU copies. bitsandbytes' own CUDA
kernels are held to "within one code step" instead (fast-math reciprocal, other FP4 thresholds, binary
search for 8 bits: shared/BNB_FORMAT.md); for 8 bits near zero, where codes are finer than kbit's 65,536
lookup bins, "within one bin".

All tests need a GPU. ``TRITON_INTERPRET=1 KBIT_TRITON_TEST_DEVICE=cpu`` runs the same kernels through
Triton's CPU interpreter instead (large shapes skipped); that mode swaps the PTX rounding helpers for numpy
operators, so it checks indexing and semantics, not the GPU's rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

import kbit.quant as kq
from kbit.quant import blockwise4, blockwise8
from kbit.quant.codebooks import bounds_4bit, code_4bit, dynamic_map
from kbit.quant.state import QuantState

DEV = os.environ.get("KBIT_TRITON_TEST_DEVICE", "cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and DEV == "cpu"
pytestmark = [] if INTERPRET else [pytest.mark.gpu]

if INTERPRET or torch.cuda.is_available():
    from kbit.kernels.triton import quant4, quant8

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
QT = ("nf4", "fp4")
ODD = (37, 333)  # 12,321 elements: odd, a partial last block for every blocksize
EVEN = (64, 128)  # 8,192 elements: whole blocks only
BIG = (4096, 11008)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Make every ``torch.empty`` return poison (NaN for floats, 0xAB for bytes) so unwritten outputs show."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xAB)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def skip_big(shape: tuple[int, ...]) -> None:
    if INTERPRET and torch.Size(shape).numel() > 100_000:
        pytest.skip("too large for Triton's interpreter")


def make_input(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int, quant_type: str = "nf4", seed: int = 0):
    """Random weights plus hard cases: a zero block, exact midpoint ties, subnormals, an all-zero tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.5
    flat = x.view(-1)
    n = flat.numel()
    if n >= 3 * blocksize:
        flat[:blocksize] = 0.0  # a whole all-zero block
        mid, _ = bounds_4bit(quant_type)
        tie = flat[blocksize : 2 * blocksize]
        tie[:] = mid.repeat(-(-blocksize // 15))[:blocksize]  # scale 1.0 below: s equals a midpoint exactly
        tie[0] = 1.0
        tie[1:3] = -mid[:2]
        if dtype == torch.float32:
            sub = flat[2 * blocksize : 3 * blocksize]
            sub[1::2] = 1e-40  # subnormal inputs in a normal block (FP4 has a midpoint at 0)
    if n % blocksize and n > blocksize:
        flat[n - n % blocksize :] = 0.0  # all-zero partial tail: stores 1e-38
    return x.to(dtype)


def ref_quant4(x: torch.Tensor, quant_type: str, blocksize: int):
    return blockwise4.quantize_4bit_ref(x.cpu(), quant_type, blocksize)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not torch.equal(actual, expected):
        bad = (actual != expected) & ~(actual.isnan() & expected.isnan())
        idx = bad.reshape(-1).nonzero()[:5].reshape(-1).tolist()
        pytest.fail(f"{what}: {int(bad.sum())} of {actual.numel()} differ, first at flat {idx}")


def state_for(absmax: torch.Tensor, x: torch.Tensor, quant_type: str, blocksize: int) -> QuantState:
    return QuantState(
        absmax=absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code_4bit(quant_type),
    )


# ---- 4-bit ----


@pytest.mark.parametrize("shape", [ODD, EVEN])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", blockwise4.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QT)
def test_quantize_4bit_identical(quant_type, blocksize, dtype, shape):
    x = make_input(shape, dtype, blocksize, quant_type)
    packed, absmax = quant4.quantize_4bit(x.to(DEV), quant_type, blocksize)
    ref_packed, ref_absmax = ref_quant4(x, quant_type, blocksize)
    assert_same(packed, ref_packed, "packed bytes")
    assert_same(absmax, ref_absmax, "absmax")


@pytest.mark.parametrize("gather", [True, False])  # both table-lookup variants of the kernel
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", blockwise4.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QT)
def test_dequantize_4bit_identical(quant_type, blocksize, dtype, out_dtype, gather):
    x = make_input(ODD, dtype, blocksize, quant_type, seed=1)
    packed, absmax = ref_quant4(x, quant_type, blocksize)
    state = state_for(absmax, x, quant_type, blocksize)
    out = quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), out_dtype, gather=gather)
    assert_same(out, blockwise4.dequantize_4bit_ref(packed, absmax, state, out_dtype), "dequantized")


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", blockwise4.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QT)
def test_dequantize_4bit_nested_one_pass(quant_type, blocksize, dtype, gather):
    """Double quant: the kernel rebuilds each scale (code8 * nested + offset, two roundings) exactly."""
    x = make_input(ODD, dtype, blocksize, quant_type, seed=2)
    packed, absmax = ref_quant4(x, quant_type, blocksize)
    state = blockwise4.compress_absmax(state_for(absmax, x, quant_type, blocksize))
    scales = blockwise4.dequantize_absmax(state)
    expected = blockwise4.dequantize_4bit_ref(packed, scales, state, torch.bfloat16)
    out = quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), torch.bfloat16, gather=gather)
    assert_same(out, expected, "dequantized")


@pytest.mark.parametrize("shape", [(3, 64), (48, 200), (5, 4096)])  # one program spans rows / a row's part
def test_dequantize_4bit_into_strided_rows(shape):
    """Written into the first columns of a wider buffer: the same values, the other columns untouched."""
    x = make_input(shape, torch.bfloat16, 64, "nf4", seed=5)
    packed, absmax = ref_quant4(x, "nf4", 64)
    state = blockwise4.compress_absmax(state_for(absmax, x, "nf4", 64))
    expected = blockwise4.dequantize_4bit_ref(packed, blockwise4.dequantize_absmax(state), state, torch.bfloat16)
    wide = torch.full((shape[0], shape[1] + 72), 7.0, dtype=torch.bfloat16, device=DEV)
    out = quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), torch.bfloat16, words_per_program=16,
                                 out=wide[:, : shape[1]])  # fmt: skip
    assert out.data_ptr() == wide.data_ptr()
    assert_same(wide[:, : shape[1]], expected, "dequantized")
    assert bool((wide[:, shape[1] :] == 7).all())
    with pytest.raises(ValueError, match="rows of a multiple of 8"):
        quant4.dequantize_4bit(
            packed.to(DEV),
            state.to(DEV),
            torch.bfloat16,
            out=torch.zeros(shape[::-1], dtype=torch.bfloat16, device=DEV).t(),
        )  # columns apart


@pytest.mark.parametrize("rows", [(0, 3), (2, 5), (40, 48), (7, 7)])
@pytest.mark.parametrize("cols", [200, 4096])  # blocks of 64 straddle rows of 200
def test_dequantize_4bit_rows(rows, cols):
    """Rows lo..hi alone (a memory plan's row pieces): those rows of the whole weight, contiguous or strided."""
    shape = (48, cols)
    x = make_input(shape, torch.bfloat16, 64, "nf4", seed=6)
    packed, absmax = ref_quant4(x, "nf4", 64)
    state = blockwise4.compress_absmax(state_for(absmax, x, "nf4", 64))
    expected = blockwise4.dequantize_4bit_ref(packed, blockwise4.dequantize_absmax(state), state, torch.bfloat16)
    lo, hi = rows
    got = quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), torch.bfloat16, words_per_program=16, rows=rows)
    assert got.shape == (hi - lo, cols)
    assert_same(got, expected[lo:hi], "rows")
    wide = torch.full((hi - lo, cols + 64), 7.0, dtype=torch.bfloat16, device=DEV)
    quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), torch.bfloat16, out=wide[:, :cols], rows=rows)
    assert_same(wide[:, :cols], expected[lo:hi], "rows into strided columns")
    assert bool((wide[:, cols:] == 7).all())
    with pytest.raises(ValueError, match="rows"):
        quant4.dequantize_4bit(packed.to(DEV), state.to(DEV), torch.bfloat16, rows=(5, 49))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", blockwise4.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QT)
def test_public_api_device_matches_cpu(quant_type, blocksize, dtype, compress):
    """kbit.quant on the device (Triton, via dispatch) equals kbit.quant on the CPU, nested stats included."""
    x = make_input(ODD, dtype, blocksize, quant_type, seed=3)
    check_public_api(x, quant_type, blocksize, compress)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1, 4095), (2, 2049), (5, 1001), (33, 65), BIG])
@pytest.mark.parametrize("quant_type", QT)
def test_awkward_shapes(quant_type, shape):
    skip_big(shape)
    for blocksize in (64, 4096):
        x = make_input(shape, torch.bfloat16, blocksize, quant_type, seed=4)
        out_dtypes = (torch.bfloat16,) if shape == BIG else FLOATS  # the CPU reference is slow at 45M
        check_public_api(x, quant_type, blocksize, compress=True, out_dtypes=out_dtypes)
        packed, absmax = quant4.quantize_4bit(x.to(DEV), quant_type, blocksize)
        ref_packed, ref_absmax = ref_quant4(x, quant_type, blocksize)
        assert_same(packed, ref_packed, f"packed bytes, blocksize {blocksize}")
        assert_same(absmax, ref_absmax, f"absmax, blocksize {blocksize}")


def check_public_api(
    x: torch.Tensor, quant_type: str, blocksize: int, compress: bool, out_dtypes: tuple = FLOATS
) -> None:
    p_dev, s_dev = kq.quantize_4bit(x.to(DEV), quant_type, blocksize, compress_statistics=compress)
    p_cpu, s_cpu = kq.quantize_4bit(x.cpu(), quant_type, blocksize, compress_statistics=compress)
    assert_same(p_dev, p_cpu, "packed bytes")
    assert_same(s_dev.absmax, s_cpu.absmax, "absmax (8-bit codes under double quant)")
    if compress:
        assert_same(s_dev.nested_absmax, s_cpu.nested_absmax, "nested_absmax")
        assert_same(s_dev.offset, s_cpu.offset, "offset")
        assert_same(s_dev.nested_code, s_cpu.nested_code, "nested code")
    for out_dtype in out_dtypes:
        expected = kq.dequantize_4bit(p_cpu, s_cpu, out_dtype)
        assert_same(kq.dequantize_4bit(p_dev, s_dev, out_dtype), expected, f"dequantized {out_dtype}")
        # bytes and state made on the CPU, dequantized on the device
        assert_same(kq.dequantize_4bit(p_cpu.to(DEV), s_cpu.to(DEV), out_dtype), expected, "cross-device")


# ---- 8-bit ----


def make_input8(shape: tuple[int, ...], dtype: torch.dtype, blocksize: int, seed: int = 0) -> torch.Tensor:
    """Random values, an all-zero block, and (float32) values one ulp around the 65,536 bin edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    if flat.numel() >= 2 * blocksize:
        flat[:blocksize] = 0.0
        if dtype == torch.float32:
            k = torch.randint(1, 65535, (blocksize,), generator=g).double()
            edge = ((k - 0.5) / 65535 * 2 - 1).float()  # scale 1.0: s sits on a bin edge
            nudge = torch.randint(-1, 2, (blocksize,), generator=g).float()
            edge = torch.nextafter(edge, edge + nudge)
            edge[0] = 1.0
            flat[blocksize : 2 * blocksize] = edge
    return x.to(dtype)


@pytest.mark.parametrize("shape", [(1,), (3, 7), ODD, (2, 4096, 3)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", blockwise8.BLOCKSIZES_8BIT)
def test_blockwise8_identical(blocksize, dtype, shape):
    code = dynamic_map(True)
    x = make_input8(shape, dtype, blocksize)
    q, absmax = quant8.quantize_blockwise(x.to(DEV), code.to(DEV), blocksize)
    ref_q, ref_absmax = blockwise8.quantize_blockwise_ref(x.cpu(), code, blocksize)
    assert_same(q, ref_q, "8-bit codes")
    assert_same(absmax, ref_absmax, "absmax")
    for out_dtype in FLOATS:
        out = quant8.dequantize_blockwise(ref_q.to(DEV), ref_absmax.to(DEV), code.to(DEV), blocksize, out_dtype)
        expected = blockwise8.dequantize_blockwise_ref(ref_q, ref_absmax, code, blocksize, out_dtype)
        assert_same(out, expected, f"dequantized {out_dtype}")


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise8_public_api_device_matches_cpu(signed):
    code = dynamic_map(signed)
    x = make_input8((100, 1000), torch.float32, 256, seed=5)
    x = x.abs() if not signed else x  # the unsigned map holds second moments
    q_dev, a_dev = kq.quantize_blockwise(x.to(DEV), code.to(DEV), 256)
    q_cpu, a_cpu = kq.quantize_blockwise(x, code, 256)
    assert_same(q_dev, q_cpu, "codes")
    assert_same(a_dev, a_cpu, "absmax")
    expected = kq.dequantize_blockwise(q_cpu, a_cpu, code, 256)
    assert_same(kq.dequantize_blockwise(q_dev, a_dev, code.to(DEV), 256), expected, "values")


# ---- against bitsandbytes' CUDA kernels: within one code step ----


def bnb_functional():
    if INTERPRET or not torch.cuda.is_available():
        pytest.skip("bitsandbytes' CUDA kernels need a GPU")
    try:
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.ones(64, device="cuda"), blocksize=64, quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - any failure means no usable CUDA build
        pytest.skip(f"bitsandbytes CUDA not usable: {e}")
    return F


def value_rank(quant_type: str) -> torch.Tensor:
    """code -> rank of its value among the table's distinct values (FP4's two zero codes share a rank)."""
    table = code_4bit(quant_type, "cuda")
    return torch.searchsorted(torch.unique(table), table)


@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("quant_type", QT)
def test_4bit_vs_bitsandbytes_cuda(quant_type, blocksize):
    """Codes within one value step of bitsandbytes' CUDA kernel; the same bytes dequantize alike."""
    F = bnb_functional()
    x = (torch.randn(BIG, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16).cuda()
    packed, state = kq.quantize_4bit(x, quant_type, blocksize)
    b_packed, b_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(state.absmax, b_state.absmax), "absmax is an exact max and must agree"
    raw, b_raw = kq.as_bytes(packed), b_packed.reshape(-1)
    codes = torch.stack([raw >> 4, raw & 15], 1).reshape(-1).long()
    b_codes = torch.stack([b_raw >> 4, b_raw & 15], 1).reshape(-1).long()
    rank = value_rank(quant_type)
    step = (rank[codes] - rank[b_codes]).abs()
    frac, frac_value = (codes != b_codes).float().mean().item(), (step > 0).float().mean().item()
    print(f"{quant_type} bs{blocksize}: codes differ from bnb CUDA at {frac:.3e}, values at {frac_value:.3e}")
    assert int(step.max()) <= 1, "codes more than one value step apart"

    ours = kq.dequantize_4bit(packed, state, torch.float32)
    theirs = F.dequantize_4bit(b_packed, b_state).float()  # bitsandbytes returns the input dtype, bf16
    table = code_4bit(quant_type, "cuda").sort().values
    scale = state.absmax.repeat_interleave(blocksize)[: x.numel()].view(x.shape)
    # one table gap (+ float32 rounding of the products), plus bf16 rounding of bitsandbytes' output
    tol = (table[1:] - table[:-1]).max() * scale * (1 + 2**-22) + theirs.abs() * 2**-8
    assert bool(((ours - theirs).abs() <= tol).all()), "dequantized values more than one code step apart"

    # the same bytes through both dequantizers (FP4 code 8 is -0.0 in bnb CUDA, +0.0 here: equal as numbers)
    ours16 = kq.dequantize_4bit(packed, state, torch.bfloat16)
    same = F.dequantize_4bit(kq.view_storage(raw, torch.uint8), b_state)
    differ = int((same != ours16).sum())
    print(f"  kbit's bytes through bnb's CUDA dequantize: {differ} of {same.numel()} bf16 values differ")
    if quant_type == "nf4":  # bnb's FP4 dequantizer uses its own decimal literals, not the table
        assert differ == 0


def test_8bit_vs_bitsandbytes_cuda():
    """Codes near bitsandbytes' CUDA binary search: within one code step, or one lookup bin near zero."""
    F = bnb_functional()
    code = dynamic_map(True, "cuda")
    x = torch.randn(4096 * 1024, generator=torch.Generator().manual_seed(7)).cuda()
    q, absmax = kq.quantize_blockwise(x, code, 256)
    b_q, b_state = F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(absmax, b_state.absmax)
    qi, bi = q.long(), b_q.long()
    step = (qi - bi).abs()
    frac = (q != b_q).float().mean().item()
    print(f"8-bit bs256: codes differ from bnb CUDA at {frac:.3e} (max {int(step.max())} codes apart)")

    def gap(i: torch.Tensor) -> torch.Tensor:  # the larger distance to a neighbouring code
        up, down = code[(i + 1).clamp(max=255)] - code[i], code[i] - code[(i - 1).clamp(min=0)]
        return torch.maximum(up, down)

    # kbit (like bitsandbytes' CPU build) takes the code of the centre of one of 65,536 bins on [-1, 1]: where
    # codes are finer than a bin (|s| < ~1e-4) that can be several codes away, but never more than a bin plus
    # the code gaps on either side. Elsewhere this is one code step.
    tol = 2 * torch.maximum(gap(qi), gap(bi)) + 2 / 65535
    assert bool(((code[qi] - code[bi]).abs() <= tol).all()), "8-bit values further apart than one step/bin"
    far = step > 1
    assert bool((code[bi][far].abs() < 1e-3).all()), "codes more than one step apart away from zero"
