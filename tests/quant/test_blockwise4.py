"""4-bit NF4/FP4 quantization is bit-exact with bitsandbytes 0.50 (its CPU backend is the oracle)."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from kbit.quant import BLOCKSIZES_4BIT, dequantize_4bit, quantize_4bit
from kbit.quant.blockwise4 import as_bytes

SHAPES = [(1, 1), (3, 7), (65, 300), (1000,), (7, 11, 13), (2, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # rows with very different scales so blocks see small and large absmax values
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
    return x.to(dtype)


def _assert_same_as_bnb(x, quant_type, blocksize, dq, storage=torch.uint8):
    ref_p, ref_s = bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type, quant_storage=storage
    )
    p, s = quantize_4bit(x, quant_type, blocksize, dq, storage)
    assert p.dtype == ref_p.dtype and p.shape == ref_p.shape
    assert torch.equal(as_bytes(p), as_bytes(ref_p))
    assert torch.equal(s.absmax, ref_s.absmax)
    assert torch.equal(s.code, ref_s.code)
    if dq:
        assert torch.equal(s.offset, ref_s.offset)
        assert torch.equal(s.nested_absmax, ref_s.state2.absmax)
        assert torch.equal(s.nested_code, ref_s.state2.code)
    # bitsandbytes' float32 products, rounded to nearest-even here: its native fp16 conversion differs from
    # round-to-nearest for some outputs on AVX-512 hosts (seen on the H100 machine's CPU), and kbit follows torch.
    ref_s.dtype = torch.float32
    ref_d = bnbf.dequantize_4bit(ref_p, ref_s).to(x.dtype)
    d = dequantize_4bit(p, s)
    assert d.dtype == x.dtype and d.shape == x.shape
    assert torch.equal(d, ref_d.reshape(x.shape))
    return p, s


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_shapes(shape, dtype, quant_type, dq):
    _assert_same_as_bnb(_sample(shape, dtype, 0), quant_type, 64, dq)


@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bit_exact_blocksizes(blocksize, quant_type):
    x = _sample((37, 257), torch.bfloat16, blocksize)  # 9,509 elements: never a multiple of the blocksize
    _assert_same_as_bnb(x, quant_type, blocksize, dq=True)
    _assert_same_as_bnb(x.float(), quant_type, blocksize, dq=False)


def test_bit_exact_large_llama_mlp_shape():
    x = _sample((4096, 11008), torch.bfloat16, 1)
    _assert_same_as_bnb(x, "nf4", 64, dq=True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_blocks_ties_and_extremes(quant_type):
    # an all-zero full block, an all-zero partial tail, exact table values (ties at midpoints), +-absmax
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    mids = (code.sort().values[1:] + code.sort().values[:-1]) / 2
    body = torch.cat([torch.zeros(64), code, -code, mids, -mids, torch.tensor([1.0, -1.0])])
    x = torch.cat([body, torch.zeros(64 - body.numel() % 64), torch.zeros(64), torch.zeros(5)])
    p, s = _assert_same_as_bnb(x, quant_type, 64, dq=False)
    assert s.absmax[0] == 0 and s.absmax[-1] == 1e-38  # bitsandbytes' stored values for zero blocks
    _assert_same_as_bnb(x, quant_type, 64, dq=True)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_views_same_bytes(storage):
    x = _sample((64, 64), torch.bfloat16, 3)
    p, s = _assert_same_as_bnb(x, "nf4", 64, dq=True, storage=storage)
    assert p.dtype == storage and p.shape == (2048 // p.element_size(), 1)
    p8, _ = quantize_4bit(x, "nf4", 64, True, torch.uint8)
    assert torch.equal(as_bytes(p), p8.reshape(-1))


def test_out_dtype_override_rounds_from_fp32():
    x = _sample((17, 64), torch.float32, 4)
    p, s = quantize_4bit(x, "nf4", 64)
    d32 = dequantize_4bit(p, s, torch.float32)
    assert torch.equal(dequantize_4bit(p, s, torch.bfloat16), d32.to(torch.bfloat16))
    assert torch.equal(dequantize_4bit(p, s, torch.float16), d32.to(torch.float16))


def test_reconstruction_error_is_small():
    # NF4 of Gaussian data: relative RMS error ~0.1 (each code step is ~1/8 of the block range); a sign flip,
    # a wrong nibble order or a wrong scale would give errors near 1.
    x = torch.randn(256, 256)
    for dq in (False, True):
        p, s = quantize_4bit(x, "nf4", 64, dq)
        err = (dequantize_4bit(p, s) - x).norm() / x.norm()
        assert 0.05 < err < 0.12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"blocksize": 48}, "blocksize 48 is not supported"),
        ({"quant_type": "int4"}, "quant_type 'int4' is not supported"),
        ({"quant_storage": torch.int32}, "quant_storage torch.int32 is not supported"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(torch.randn(64), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="dtype torch.int64"):
        quantize_4bit(torch.arange(64))
    x = torch.randn(64)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        quantize_4bit(x)
    x[3] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_4bit(x)
    p, s = quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="out_dtype torch.int8"):
        dequantize_4bit(p, s, torch.int8)
    with pytest.raises(ValueError, match="needs 32"):
        dequantize_4bit(p[:10], s)
