"""Packed bytes viewed as float storage survive every move unchanged, NaN and denormal patterns included.

bitsandbytes#1945: NaN canonicalization silently corrupted packed NF4 stored as bf16. Every 16-bit pattern (and every
class of 32-bit pattern: NaNs with payloads, infinities, denormals, signed zeros) goes through storage views, device
moves, Parameter wrapping, torch and safetensors state-dict round trips and FSDP-style split/concat.
"""

import io

import pytest
import safetensors.torch
import torch

from kbit.quant import dequantize_4bit, quantize_4bit
from kbit.quant.blockwise4 import as_bytes, view_storage

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _all_16bit_patterns() -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)  # 131,072 bytes


def _fp32_pattern_classes() -> torch.Tensor:
    words = []
    for sign in (0, 1):
        for exp in (0x00, 0x01, 0x7F, 0xFE, 0xFF):  # zero/denormal, smallest normal, 1.0, largest, inf/NaN
            for mant in (0, 1, 2, 0x3FFFFF, 0x400000, 0x400001, 0x7FFFFF, 0x123456):
                words.append((sign << 31) | (exp << 23) | mant)
    return torch.tensor(words, dtype=torch.int64).to(torch.int32).view(torch.uint8)


def _journeys(t: torch.Tensor, device: str):
    """Yield (name, tensor) for each way a packed weight gets moved around."""
    yield "to-device-and-back", t.to(device).cpu()
    yield "parameter", torch.nn.Parameter(t.to(device), requires_grad=False).data.cpu()
    yield "clone-contiguous", t.to(device).clone().contiguous().cpu()
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    yield "torch.save", torch.load(buf)["w"]
    yield "safetensors", safetensors.torch.load(safetensors.torch.save({"w": t.contiguous()}))["w"]
    shards = torch.chunk(t.reshape(-1).to(device), 4)  # dim-0 sharding as FSDP does, then all-gather
    yield "shard-concat", torch.cat([s.clone() for s in shards]).reshape(t.shape).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_every_bit_pattern_survives(storage, device):
    raw = (
        _all_16bit_patterns()
        if storage != torch.float32
        else torch.cat([_all_16bit_patterns(), _fp32_pattern_classes()])
    )
    stored = view_storage(raw, storage)
    assert stored.dtype == storage
    for name, moved in _journeys(stored, device):
        assert moved.dtype == storage, name
        assert torch.equal(as_bytes(moved), raw), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_after_journeys(storage, device):
    x = torch.randn(96, 64)
    p, s = quantize_4bit(x, "nf4", 64, True, storage)
    expected = dequantize_4bit(p, s)
    for name, moved in _journeys(p, device):
        assert torch.equal(dequantize_4bit(moved, s), expected), name
