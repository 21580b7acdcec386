"""Blockwise dynamic 8-bit quantization is bit-exact with bitsandbytes' CPU backend."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from kbit.quant import BLOCKSIZES_8BIT, dequantize_blockwise, dynamic_map, quantize_blockwise


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bnb(signed):
    m = dynamic_map(signed)
    assert torch.equal(m, bnbf.create_dynamic_map(signed=signed))
    assert m.numel() == 256 and m[-1] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
def test_bit_exact(dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    n = 40_003
    # magnitudes over ten decades exercise every exponent band of the dynamic map
    x = (torch.randn(n, generator=g) * torch.logspace(-8, 2, n)[torch.randperm(n, generator=g)]).to(dtype)
    x[:blocksize] = 0  # an all-zero block
    q_ref, st = bnbf.quantize_blockwise(x, blocksize=blocksize)
    q, absmax = quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(q, q_ref) and torch.equal(absmax, st.absmax)
    d = dequantize_blockwise(q, absmax, blocksize=blocksize, out_dtype=dtype)
    st.dtype = torch.float32  # bitsandbytes' float32 products; see test_blockwise4 for why the cast is torch's
    assert torch.equal(d, bnbf.dequantize_blockwise(q_ref, st).to(dtype))


@pytest.mark.parametrize("signed", [True, False])
def test_bin_edges_exact(signed):
    # values a few ulps either side of every one of the 65,535 bin edges, with absmax 1 so they are not rescaled
    k = torch.arange(1, 65535, dtype=torch.float64)
    edge = (2 * (k - 0.5) / 65535 - 1).float()
    vals, up, down = [edge], edge, edge
    for _ in range(2):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        vals += [up, down]
    x = torch.cat(vals)
    x = x[: x.numel() // 255 * 255].view(-1, 255)
    x = torch.cat([torch.ones(x.shape[0], 1), x], 1).reshape(-1)
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    q_ref, st = bnbf.quantize_blockwise(x, code=code, blocksize=256)
    q, absmax = quantize_blockwise(x, code, 256)
    assert torch.equal(q, q_ref)


def test_errors():
    with pytest.raises(ValueError, match="blocksize 100 is not supported for 8-bit"):
        quantize_blockwise(torch.randn(10), blocksize=100)
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_blockwise(torch.zeros(4, dtype=torch.int8), torch.ones(1), blocksize=64)
