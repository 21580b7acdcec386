"""The fused 4-bit GEMV (decode-sized ``x @ dequant(W)^T + b + s·(x A^T) B^T``) against dequantize-then-matmul.

In its default (exact) mode the kernel multiplies the same rounded weights the dequantizer writes, in float32, so
it is held to float32 summation-order error plus one output rounding against a float64 reference built from the
dequantized weights; the factored mode (scale times block sum) to the bf16 output tolerance.
Runs on a GPU, or through Triton's interpreter with ``TRITON_INTERPRET=1 KBIT_TRITON_TEST_DEVICE=cpu``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kbit.quant import dequantize_4bit, quantize_4bit

DEV = os.environ.get("KBIT_TRITON_TEST_DEVICE", "cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and DEV == "cpu"
pytestmark = [] if INTERPRET else [pytest.mark.gpu]

if INTERPRET or torch.cuda.is_available():
    pytest.importorskip("triton")
    from kbit.kernels.triton import gemv4

SHAPES = [(64, 256)] if INTERPRET else [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (96, 320)]


def _reference(x, w, bias, xa, lora_b, scale):
    y = x.double() @ w.double().t()
    if bias is not None:
        y += bias.double()
    if xa is not None:
        y += scale * (xa.double() @ lora_b.double().t())
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("extras", ["none", "bias", "lora", "both"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv_matches_dequantized_matmul(shape, nested, extras, quant_type):
    rows = 1
    if not INTERPRET and extras in ("bias", "lora") and shape != (4096, 4096):
        pytest.skip("extras are checked on one shape")
    g = torch.Generator().manual_seed(shape[0] + nested)
    n, k = shape
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, quant_type, 64, nested)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEV) if extras in ("bias", "both") else None
    xa = lora_b = None
    if extras in ("lora", "both"):
        xa = torch.randn(rows, 16, generator=g).to(torch.bfloat16).to(DEV)
        lora_b = (torch.randn(n, 16, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    y = gemv4.gemv_4bit(x, packed, state, bias, xa, lora_b, 2.0)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    deq = dequantize_4bit(packed, state, out_dtype=torch.bfloat16)
    ref = _reference(x, deq, bias, xa, lora_b, 2.0)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    # the bf16 output rounding (2^-9 relative) is all that may differ, plus LUT's bfloat16 codes (2^-8 per code)
    assert err < (6e-3 if gemv4.CONFIG[4] >= gemv4.LUT else 4e-3), err
    assert torch.isfinite(y).all()


MODES = {"exact": 0, "factored": 1, "lut": 3, "rows": 4}
CONFIGS = {"exact": (8, 4, 2, 1, 0), "factored": (8, 4, 2, 1, 1), "lut": (8, 4, 2, 1, 3), "rows": (4, 3, 4, 1, 4)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modes_and_ragged_tiles(mode, dtype):
    """Every arithmetic mode, a ragged last tile (K not a multiple of the tile), and a float16 row."""
    g = torch.Generator().manual_seed(2 * (mode == "exact"))
    n, k = (40, 448) if INTERPRET else (1000, 4032)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEV)
    y = gemv4.gemv_4bit(x, packed, state, config=CONFIGS[mode])  # rows: groups of 4 rows, 3 a program
    deq = dequantize_4bit(packed, state, out_dtype=dtype)
    ref = _reference(x, deq, None, None, None, 1.0)
    assert y.dtype == dtype
    # LUT modes multiply bfloat16-rounded codes (as bitsandbytes' GEMV does): up to 2^-8 relative per code
    assert ((y.double() - ref).norm() / ref.norm()).item() < (6e-3 if mode in ("lut", "rows") else 4e-3)
    if mode == "exact":  # the same weights: only float32 summation order differs, then one rounding
        assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("tiling", ["lut", "rows"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_lut_mode_multiplies_bfloat16_codes(quant_type, blocksize, tiling):
    """LUT mode (PRMT lookups on a GPU) equals, to float32 summation order, the sum over blocks of the block scale
    times the bfloat16-rounded codes times x: every one of a word's eight codes is looked up in its place."""
    g = torch.Generator().manual_seed(blocksize + (quant_type == "fp4"))
    n, k = (24, 512) if INTERPRET else (512, 4096)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, quant_type, blocksize, False)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
    lut = gemv4.lut_table(state.code)
    values = lut[:16].cpu().double()
    bf16_codes = state.code.cpu().float().to(torch.bfloat16).double()
    assert ((values - bf16_codes).abs() <= bf16_codes.abs() * 2**-22).all()  # to 2^-16 of a bfloat16 step
    y = gemv4.gemv_4bit(x, packed, state, config=CONFIGS[tiling])
    raw = packed.cpu().reshape(-1)
    codes = torch.stack([raw >> 4, raw & 15], dim=1).reshape(n, k).long()  # element 2i: high nibble of byte i
    blocks = (values[codes] * x.cpu().double()).reshape(n, k // blocksize, blocksize).sum(-1)
    ref = (blocks * state.absmax.cpu().double().reshape(n, -1)).sum(-1)
    assert ((y.cpu().double()[0] - ref).abs() <= ref.abs() * 2**-8 + 1e-4).all()


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    rows = 1
    g = torch.Generator().manual_seed(blocksize)
    n, k = (48, 512) if INTERPRET else (1024, 4096)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", blocksize, True)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(DEV)
    y = gemv4.gemv_4bit(x, packed, state)
    ref = _reference(x, dequantize_4bit(packed, state, out_dtype=torch.bfloat16), None, None, None, 1.0)
    assert ((y.double() - ref).norm() / ref.norm()).item() < (6e-3 if gemv4.CONFIG[4] >= gemv4.LUT else 4e-3)


def test_more_rows_take_the_dequantize_path():
    from kbit.kernels import dispatch

    g = torch.Generator().manual_seed(9)
    w = (torch.randn(96, 256, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="one row"):
        gemv4.gemv_4bit(x, packed, state)
    expect = torch.nn.functional.linear(x, dequantize_4bit(packed, state, out_dtype=torch.bfloat16))
    assert torch.equal(dispatch.gemv_4bit(x, packed, state), expect)


def test_residual_is_added_as_a_separate_addition():
    g = torch.Generator().manual_seed(11)
    n, k = (64, 256) if INTERPRET else (4096, 4096)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
    res = torch.randn(1, n, generator=g).to(torch.bfloat16).to(DEV)
    xa = torch.randn(1, 8, generator=g).to(torch.bfloat16).to(DEV)
    lora_b = (torch.randn(n, 8, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    plain = gemv4.gemv_4bit(x, packed, state, None, xa, lora_b, 0.5)
    fused = gemv4.gemv_4bit(x, packed, state, None, xa, lora_b, 0.5, residual=res)
    assert torch.equal(fused, plain + res)  # bit for bit: the kernel rounds, then adds as torch's add does


@pytest.mark.parametrize("k", [256, 1000] if INTERPRET else [4096, 14336, 1000])
def test_lora_down_partials_feed_the_epilogue(k):
    """lora_down's float32 slices summed in the GEMV's epilogue equal F.linear(x, A) (rounded as it rounds)."""
    g = torch.Generator().manual_seed(k)
    n, r = 64, 48
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
    a = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
    parts = gemv4.lora_down(x, a)
    assert parts.shape == (-(-k // gemv4.LORA_DOWN_BK), r) and parts.dtype == torch.float32
    ref = x.double() @ a.double().t()
    assert torch.allclose(parts.double().sum(0, keepdim=True), ref, rtol=1e-5, atol=1e-5)
    # a column slice of the stacked partials (q's part of q/k/v) is what the decoder passes
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    lora_b = (torch.randn(n, 16, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    xa_bf16 = (x.float() @ a.float().t()).to(torch.bfloat16)[:, 16:32]
    y_parts = gemv4.gemv_4bit(x, packed, state, None, parts[:, 16:32], lora_b, 2.0)
    y_rounded = gemv4.gemv_4bit(x, packed, state, None, xa_bf16, lora_b, 2.0)
    assert ((y_parts.float() - y_rounded.float()).abs() <= y_rounded.float().abs() * 2**-7 + 1e-3).all()


def test_rows_tiling_with_bias_lora_and_residual_equals_lut():
    """The whole-row tiling (x loaded once per program) gives LUT's result with every epilogue term: the same
    products, summed in another order."""
    g = torch.Generator().manual_seed(7)
    n, k, r = (40, 512, 4) if INTERPRET else (4096, 4096, 16)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEV)
    a = (torch.randn(r, k, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
    b = (torch.randn(n, r, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
    res = torch.randn(1, n, generator=g).to(torch.bfloat16).to(DEV)
    xa = gemv4.lora_down(x, a)
    ys = {t: gemv4.gemv_4bit(x, packed, state, bias, xa, b, 2.0, res, config=CONFIGS[t]) for t in ("lut", "rows")}
    torch.testing.assert_close(ys["rows"].float(), ys["lut"].float(), rtol=2**-7, atol=2**-7)


def _gluon():
    try:
        from kbit.kernels.triton import gemv4_smem
    except ImportError:  # a Triton without Gluon
        pytest.skip("this Triton has no Gluon")
    return gemv4_smem


@pytest.mark.skipif(INTERPRET, reason="Gluon kernels run on a GPU only")
def test_smem_path_equals_factored_with_every_epilogue_term():
    """The shared-memory-table kernel (Hopper) gives FACTORED's result with bias, LoRA partial sums and the residual,
    with and without programmatic dependent launch; the dispatcher takes it for a bfloat16 row."""
    smem = _gluon()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the shared-memory-table kernel is for Hopper and newer")
    g = torch.Generator().manual_seed(11)
    for n, k in ((4096, 4096), (14336, 4096), (96, 320)):
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
        packed, state = quantize_4bit(w, "nf4", 64, True)
        x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
        bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEV)
        a = (torch.randn(16, k, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
        b = (torch.randn(n, 16, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
        res = torch.randn(1, n, generator=g).to(torch.bfloat16).to(DEV)
        xa = gemv4.lora_down(x, a)
        # FACTORED: the same float32 codes and scale-times-block-sum, summed in another order
        factored = gemv4.gemv_4bit(x, packed, state, bias, xa, b, 2.0, res, config=CONFIGS["factored"])
        for pdl in (False, True):
            y = smem.gemv_4bit(x, packed.reshape(-1), state, bias, xa, b, 2.0, res, pdl=pdl)
            torch.testing.assert_close(y.float(), factored.float(), rtol=2**-7, atol=2**-6)
        # the dispatcher's default: the same kernel, bit for bit
        assert torch.equal(gemv4.gemv_4bit(x, packed, state, bias, xa, b, 2.0, res), y)
        # fp32 codes: closer to the dequantized weights than LUT's bfloat16 codes
        deq = dequantize_4bit(packed, state, out_dtype=torch.bfloat16)
        ref = _reference(x, deq, bias, xa.sum(0, keepdim=True).to(torch.bfloat16), b, 2.0) + res.double()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.skipif(INTERPRET, reason="Gluon kernels run on a GPU only")
@pytest.mark.parametrize("rows", [2, 3, 4])
def test_smem_path_takes_up_to_four_rows_in_one_pass(rows):
    """Two to four rows of x (a decode batch) in one pass over the weight: each row as FACTORED gives it alone, with
    bias, LoRA (x A^T per row) and a residual per row; the dispatcher takes it too."""
    _gluon()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the shared-memory-table kernel is for Hopper and newer")
    from kbit.kernels import dispatch

    g = torch.Generator().manual_seed(rows)
    n, k = 4096, 4096
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(DEV)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEV)
    a = (torch.randn(16, k, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
    b = (torch.randn(n, 16, generator=g) * 0.05).to(torch.bfloat16).to(DEV)
    res = torch.randn(rows, n, generator=g).to(torch.bfloat16).to(DEV)
    xa = torch.nn.functional.linear(x, a)
    y = gemv4.gemv_4bit(x, packed, state, bias, xa, b, 2.0, res)
    assert y.shape == (rows, n)
    for i in range(rows):
        one = gemv4.gemv_4bit(x[i : i + 1], packed, state, bias, xa[i : i + 1], b, 2.0, res[i : i + 1],
                              config=CONFIGS["factored"])  # fmt: skip
        torch.testing.assert_close(y[i : i + 1].float(), one.float(), rtol=2**-7, atol=2**-6)
    assert torch.equal(dispatch.gemv_4bit(x, packed, state, bias, xa, b, 2.0, res), y)


@pytest.mark.skipif(INTERPRET, reason="Gluon kernels run on a GPU only")
def test_a_gluon_kernel_that_does_not_compile_falls_back_once(monkeypatch, caplog):
    """Another Triton's Gluon API: the first call that fails to compile logs one warning and the Triton kernel (one
    row) or dequantize-then-matmul (more rows) answers, then and after."""
    smem = _gluon()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the shared-memory-table kernel is for Hopper and newer")

    def broken(*args, **kwargs):
        raise TypeError("an API this Triton does not have")

    monkeypatch.setattr(smem, "gemv_4bit", broken)
    monkeypatch.setitem(gemv4._SMEM_STATE, "ok", None)
    g = torch.Generator().manual_seed(13)
    w = (torch.randn(512, 1024, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(3, 1024, generator=g).to(torch.bfloat16).to(DEV)
    with caplog.at_level("WARNING", logger="kbit"):
        y = gemv4.gemv_4bit(x, packed, state)
    assert "does not compile" in caplog.text and gemv4._SMEM_STATE["ok"] is False
    assert torch.equal(y, torch.nn.functional.linear(x, dequantize_4bit(packed, state, out_dtype=torch.bfloat16)))
    one = gemv4.gemv_4bit(x[:1], packed, state)
    assert torch.equal(one, gemv4.gemv_4bit(x[:1], packed, state, config=gemv4.CONFIG))


@pytest.mark.skipif(INTERPRET, reason="Gluon kernels run on a GPU only")
def test_smem_path_chained_in_a_cuda_graph_waits_for_its_input():
    """Launched as programmatic dependents in one CUDA graph, each GEMV reads x only after the kernel writing it has
    finished: a chain of four GEMVs (each one's output the next one's input) replays to the eager results."""
    smem = _gluon()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the shared-memory-table kernel is for Hopper and newer")
    g = torch.Generator().manual_seed(12)
    n = 4096
    qs = [quantize_4bit((torch.randn(n, n, generator=g) * 0.02).to(torch.bfloat16).to(DEV), "nf4", 64, True)
          for _ in range(4)]  # fmt: skip
    x = torch.randn(1, n, generator=g).to(torch.bfloat16).to(DEV)

    def chain(x):
        for packed, state in qs:
            x = gemv4.gemv_4bit(x, packed, state) * 8  # an eager op between two of them as well
            x = gemv4.gemv_4bit(x, packed, state)
        return x

    eager = chain(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = chain(x)
    for _ in range(3):
        x.copy_(torch.randn(1, n, generator=g).to(torch.bfloat16).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain(x))
    assert smem.smem_table(qs[0][1].code, build=False) is not None
    assert torch.isfinite(eager).all()
