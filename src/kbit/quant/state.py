"""QuantState: everything needed to dequantize a packed 4-bit tensor, in bitsandbytes' serialized layout.

The serialized form (``as_dict(packed=True)``) is byte-for-byte what ``bitsandbytes.functional.QuantState`` writes:
tensors ``absmax``, ``quant_map`` (+ ``nested_absmax``, ``nested_quant_map`` with double quantization) and one
uint8 tensor ``quant_state.bitsandbytes__<type>`` holding the JSON of the non-tensor fields, in bitsandbytes' order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .codebooks import QUANT_TYPES_4BIT

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling bitsandbytes serializes)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantState:
    """Statistics and metadata of one blockwise 4-bit tensor.

    Without double quantization ``absmax`` is float32 [ceil(n / blocksize)]. With it, ``absmax`` holds uint8 codes
    of ``absmax - offset`` under the signed dynamic map, scaled per ``nested_blocksize`` block by
    ``nested_absmax``; :func:`dequantize_absmax` undoes that.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # 16-entry float32 table ("quant_map")
    offset: torch.Tensor | None = None  # float32 scalar, double quant only
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    nested_dtype: torch.dtype = field(default=torch.float32)

    @property
    def nested(self) -> bool:
        """True when the block scales are themselves 8-bit quantized (double quantization)."""
        return self.nested_absmax is not None

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device`` (the original is not modified)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            absmax=mv(self.absmax),
            code=mv(self.code),
            offset=mv(self.offset),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state in bitsandbytes' layout; ``packed=True`` gives only tensors (safetensors-ready)."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                nested_absmax=self.nested_absmax,
                nested_blocksize=self.nested_blocksize,
                nested_quant_map=self.nested_code.clone(),
                nested_dtype=dtype_name(self.nested_dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[_PACKED_PREFIX + self.quant_type] = pack_json(meta)
        return tensors

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str | None = None, where: str = "") -> QuantState:
        """Rebuild from ``as_dict`` output (packed or not, keys may carry a ``weight.`` style prefix).

        ``where`` names the source (e.g. a state-dict prefix) in error messages.
        """
        at = f" in {where}" if where else ""
        flat: dict[str, Any] = {}
        for key, value in d.items():
            if "quant_state.bitsandbytes__" in key:
                qtype = key.rsplit("__", 1)[-1]
                if qtype not in QUANT_TYPES_4BIT:
                    raise ValueError(f"unknown quant state key {key!r}{at}; expected a suffix in {QUANT_TYPES_4BIT}")
                try:
                    flat.update(unpack_json(value))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"corrupt quant state {key!r}{at}: not valid JSON ({e})") from None
            else:
                flat[key.rsplit(".", 1)[-1]] = value
        for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if key not in flat:
                raise ValueError(f"quant state{at} is missing {key!r}; it needs absmax, quant_map and the packed JSON")
        nested = "nested_absmax" in flat
        if nested:
            for key in ("nested_quant_map", "nested_offset", "nested_blocksize"):
                if key not in flat:
                    raise ValueError(f"quant state{at} has nested_absmax but is missing {key!r}")
        if flat["dtype"] not in _DTYPES:
            raise ValueError(f"quant state{at} has dtype {flat['dtype']!r}; expected one of {list(_DTYPES)}")
        dev = device if device is not None else flat["absmax"].device
        state = cls(
            absmax=flat["absmax"].to(dev),
            shape=torch.Size(flat["shape"]),
            dtype=_DTYPES[flat["dtype"]],
            blocksize=int(flat["blocksize"]),
            quant_type=flat["quant_type"],
            code=flat["quant_map"].to(dev),
            offset=torch.tensor(float(flat["nested_offset"]), device=dev) if nested else None,
            nested_absmax=flat["nested_absmax"].to(dev) if nested else None,
            nested_code=flat["nested_quant_map"].to(dev) if nested else None,
            nested_blocksize=int(flat.get("nested_blocksize", 256)),
            nested_dtype=_DTYPES[flat.get("nested_dtype", "float32")],
        )
        state.validate(where)
        return state

    def validate(self, where: str = "") -> None:
        """Check that the statistics are consistent with the shape and blocksize; raise ValueError if not."""
        at = f" in {where}" if where else ""
        n = 1
        for s in self.shape:
            n *= int(s)
        blocks = -(-n // self.blocksize)
        if self.quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant state{at} has quant_type {self.quant_type!r}; expected one of {QUANT_TYPES_4BIT}")
        if self.code.numel() != 16:
            raise ValueError(f"quant state{at}: quant_map has {self.code.numel()} entries, expected 16")
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"quant state{at}: absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with "
                f"blocksize {self.blocksize} needs {blocks}"
            )
        if self.nested:
            nb = -(-blocks // self.nested_blocksize)
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"quant state{at}: double-quantized absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_absmax.numel() != nb:
                raise ValueError(f"quant state{at}: nested_absmax has {self.nested_absmax.numel()} entries, need {nb}")
            if self.nested_code.numel() != 256:
                raise ValueError(f"quant state{at}: nested_quant_map has {self.nested_code.numel()} entries, need 256")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"quant state{at}: absmax must be float32 without double quant, got {self.absmax.dtype}")


def pack_json(meta: dict[str, Any]) -> torch.Tensor:
    """A dict as the uint8 tensor of its UTF-8 JSON (bitsandbytes' ``pack_dict_to_tensor``)."""
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_json`."""
    return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
