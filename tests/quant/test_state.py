"""QuantState serializes exactly as bitsandbytes' QuantState and rejects damaged state dicts by key."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from kbit.quant import QuantState, dequantize_4bit, quantize_4bit
from kbit.quant.state import pack_json


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_equals_bnb(dq, quant_type):
    x = torch.randn(64, 300, dtype=torch.bfloat16)
    _, ref = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type=quant_type)
    _, st = quantize_4bit(x, quant_type, 64, dq)
    ours, theirs = st.as_dict(packed=True), ref.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    if dq:  # the JSON example from BNB_FORMAT.md: key order and spelling
        meta = bytes(ours[f"quant_state.bitsandbytes__{quant_type}"].numpy()).decode()
        assert meta.startswith(
            f'{{"quant_type": "{quant_type}", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 300]'
        )
        assert '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": ' in meta


@pytest.mark.parametrize("dq", [False, True])
def test_from_bnb_dict_round_trip(dq):
    x = torch.randn(33, 17)
    p, ref = bnbf.quantize_4bit(x, blocksize=128, compress_statistics=dq, quant_type="nf4")
    prefixed = {f"layer.weight.{k}": v for k, v in ref.as_dict(packed=True).items()}
    st = QuantState.from_dict(prefixed)
    assert st.shape == x.shape and st.blocksize == 128 and st.nested == dq
    assert torch.equal(dequantize_4bit(p, st), bnbf.dequantize_4bit(p, ref))
    again = QuantState.from_dict(st.as_dict(packed=True))
    assert torch.equal(dequantize_4bit(p, again), dequantize_4bit(p, st))
    back = bnbf.QuantState.from_dict(st.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(p, back), dequantize_4bit(p, st))


def _packed(dq=True):
    _, st = quantize_4bit(torch.randn(64, 300), "nf4", 64, dq)
    return {f"w.weight.{k}": v for k, v in st.as_dict(packed=True).items()}


def test_missing_keys_named():
    d = _packed()
    del d["w.weight.absmax"]
    with pytest.raises(ValueError, match="missing 'absmax'"):
        QuantState.from_dict(d, where="w.weight")
    d = _packed()
    del d["w.weight.nested_quant_map"]
    with pytest.raises(ValueError, match="missing 'nested_quant_map'"):
        QuantState.from_dict(d)
    d = _packed()
    del d["w.weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="missing 'quant_type'"):
        QuantState.from_dict(d)


def test_corrupt_entries_named():
    d = _packed()
    d["w.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"corrupt quant state 'w.weight.quant_state.bitsandbytes__nf4' in w.weight"):
        QuantState.from_dict(d, where="w.weight")
    d = _packed(dq=False)
    d["w.weight.absmax"] = d["w.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax has 299 entries but shape"):
        QuantState.from_dict(d)
    d = _packed()
    d["w.weight.quant_state.bitsandbytes__int4"] = d.pop("w.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="unknown quant state key"):
        QuantState.from_dict(d)
    d = _packed()
    d["w.weight.quant_state.bitsandbytes__nf4"] = pack_json(
        {
            "quant_type": "nf4",
            "blocksize": 64,
            "dtype": "int8",
            "shape": [64, 300],
            "nested_blocksize": 256,
            "nested_dtype": "float32",
            "nested_offset": 0.1,
        }
    )
    with pytest.raises(ValueError, match="dtype 'int8'"):
        QuantState.from_dict(d)
