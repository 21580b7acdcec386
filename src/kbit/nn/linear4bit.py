"""Linear4bit: a frozen NF4/FP4 linear layer whose state dict is bitsandbytes' ``Linear4bit`` format.

Design:
- The packed weight is ``self.weight``, an ``nn.Parameter(requires_grad=False)`` of shape
  (bytes / itemsize, 1) in ``quant_storage``. The statistics are non-persistent buffers (``absmax``,
  ``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``nested_offset``), so ``.to(device)`` moves
  them with the weight; the metadata (quant type, blocksize, ...) are plain attributes, and
  :attr:`Linear4bit.quant_state` assembles a ``QuantState`` view of it all.
- ``_apply`` lets device moves through but makes dtype conversions of the packed weight and statistics
  no-ops: ``.half()`` on a bfloat16-*stored* weight would corrupt it. The bias is cast like any parameter.
- Quantization happens once, explicitly: in the constructor (a kaiming-initialised weight, as
  ``nn.Linear``), in :meth:`Linear4bit.from_linear`, or never (:meth:`Linear4bit.from_quantized`,
  ``load_state_dict``). On the ``meta`` device the constructor allocates placeholders of the right
  shapes only, for streaming loaders; loading into a meta layer materializes it (assign semantics).
- ``load_state_dict`` adopts the checkpoint's quant type, blocksize and double quant (the state dict is
  the truth) and re-views its bytes as this layer's ``quant_storage`` (the same bytes in every dtype).
- FSDP2 shards the packed weight like any parameter (on dim 0) and leaves the statistics, buffers, whole on
  every rank; it gathers in one dtype, so the weight is re-viewed with :meth:`Linear4bit.set_quant_storage`
  to the compute dtype (kbit.dist).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ..quant import as_bytes, dequantize_4bit, quantize_4bit, view_storage
from ..quant.blockwise4 import NESTED_BLOCKSIZE, check_blocksize
from ..quant.codebooks import QUANT_TYPES_4BIT, check_quant_type
from ..quant.state import QuantState, dtype_name, unpack_json
from ..quant.validate import STORAGE_DTYPES, check_out_dtype, check_storage
from .functional import apply_keeping_dtype, dequant_linear, linear_bias

_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
_JSON_PREFIX = "quant_state.bitsandbytes__"


class Linear4bit(nn.Module):
    """``y = x @ dequantize(W)^T + b`` with W frozen in bitsandbytes' blockwise 4-bit format."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_out_dtype(compute_dtype)
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_storage(quant_storage)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype, self.quant_storage = compute_dtype, quant_storage
        # Rows per dequantized piece where the fused LoRA nodes rebuild W (None: whole): a memory plan's choice.
        self.dequant_rows: int | None = None
        for name in _STATS:
            self.register_buffer(name, None, persistent=False)
        dev = torch.empty(0, device=device).device  # honours `with torch.device(...)` when device is None
        shape, options = (self.out_features, self.in_features), (quant_type, blocksize, compress_statistics)
        if dev.type == "meta":  # shapes only: load_state_dict(assign=True) or a streaming loader fills them
            packed, state = _placeholders(shape, *options, quant_storage, compute_dtype, dev)
        else:
            w = torch.empty(shape, device=dev)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's initialisation
            packed, state = quantize_4bit(w.to(compute_dtype), *options, quant_storage)
        self._set_quantized(packed, state)
        self.register_parameter("bias", linear_bias(self.in_features, self.out_features, dev) if bias else None)

    # ---- construction from existing weights ----

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
    ) -> Linear4bit:
        """Quantize ``linear.weight`` once (on its device, from its dtype) and copy its bias."""
        w = linear.weight.detach()
        options = (compute_dtype, quant_type, compress_statistics, quant_storage, blocksize)
        layer = cls(linear.in_features, linear.out_features, False, *options, device="meta")
        if w.is_meta:  # streaming loaders: shapes only, the values arrive with load_state_dict
            layer.weight_dtype = w.dtype
        else:
            packed, state = quantize_4bit(w, quant_type, blocksize, compress_statistics, quant_storage)
            layer._set_quantized(packed, state)
        if linear.bias is not None:
            b = linear.bias.detach().clone()
            layer.bias = nn.Parameter(b, requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        packed: torch.Tensor,
        quant_state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_storage: torch.dtype | None = None,
    ) -> Linear4bit:
        """Wrap packed data without re-quantizing or copying (the state moves to ``packed.device``)."""
        if len(quant_state.shape) != 2:
            raise ValueError(f"a linear weight is 2-D; quant_state.shape is {tuple(quant_state.shape)}")
        out_f, in_f = (int(s) for s in quant_state.shape)
        qs = quant_state
        options = (compute_dtype, qs.quant_type, qs.nested, quant_storage or packed.dtype, qs.blocksize)
        layer = cls(in_f, out_f, False, *options, device="meta")
        layer._set_quantized(packed, quant_state.to(packed.device))
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        return layer

    def _set_quantized(self, packed: torch.Tensor, state: QuantState, where: str = "") -> None:
        """Install packed bytes and their statistics (validated) as this layer's weight."""
        state.validate(where)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{where or 'quant_state'}: weight shape {list(state.shape)} does not match this layer's "
                f"[out_features, in_features] = [{self.out_features}, {self.in_features}]"
            )
        _check_packed_size(packed, state.shape.numel(), where or "packed weight")
        self.weight = nn.Parameter(view_storage(as_bytes(packed), self.quant_storage), requires_grad=False)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self.compress_statistics = state.nested
        self.nested_blocksize, self.nested_dtype = state.nested_blocksize, state.nested_dtype
        self.absmax, self.quant_map = state.absmax, state.code
        self.nested_absmax, self.nested_quant_map, self.nested_offset = (
            state.nested_absmax,
            state.nested_code,
            state.offset,
        )

    def set_quant_storage(self, quant_storage: torch.dtype) -> None:
        """Re-view the packed bytes as ``quant_storage`` in place: the same bytes, never converted.

        FSDP needs the packed weight in the dtype it gathers in (bf16), whatever storage a checkpoint used.
        """
        check_storage(quant_storage)
        if quant_storage == self.quant_storage:
            return
        state = self.quant_state
        # the bytes of the weight only: a wider storage's padding byte must not survive into a narrower one
        packed = as_bytes(self._packed().detach())[: (state.shape.numel() + 1) // 2]
        self.quant_storage = quant_storage
        self._set_quantized(packed, state)

    # ---- the layer ----

    @property
    def quant_state(self) -> QuantState:
        """The layer's weight statistics as a ``QuantState`` (views of the buffers, no copies)."""
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=self.quant_map,
            offset=self.nested_offset,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map,
            nested_blocksize=self.nested_blocksize,
            nested_dtype=self.nested_dtype,
        )

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The weight [out_features, in_features] in ``dtype`` (default ``compute_dtype``), or written into ``out``
        (that shape, rows possibly strided: the first columns of a wider buffer); ``rows=(lo, hi)``: those rows."""
        return dequantize_4bit(
            self._packed(), self.quant_state, out_dtype=dtype or self.compute_dtype, out=out, rows=rows
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` computed in ``compute_dtype``, returned in ``x.dtype``; no state is modified."""
        dequant = partial(dequantize_4bit, self._packed(), self.quant_state)
        return dequant_linear(x, dequant, self.bias, self.compute_dtype)

    def _packed(self) -> torch.Tensor:
        # Casts that bypass _apply (FSDP mixed precision casts parameters itself) change the dtype: refuse
        # to read bytes that were converted as if they were numbers.
        if self.weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"the packed weight is {self.weight.dtype} but quant_storage is {self.quant_storage}: it was "
                "cast and its bytes are corrupt. Keep FSDP's param_dtype equal to quant_storage (or None)."
            )
        return self.weight

    def _apply(self, fn, recurse: bool = True):
        # Device moves reach the packed weight and statistics; dtype casts skip them (bitsandbytes#1945).
        frozen = [self.weight, *(getattr(self, name) for name in _STATS)]
        return super()._apply(apply_keeping_dtype(fn, frozen), recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"compress_statistics={self.compress_statistics}, "
            f"compute_dtype={dtype_name(self.compute_dtype)}, quant_storage={dtype_name(self.quant_storage)}"
        )

    # ---- state dict: bitsandbytes' keys ----

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed), bias
        state = self.quant_state
        on_meta = self.weight.is_meta
        if on_meta and state.nested:  # no offset value on meta: a placeholder JSON, meta like all entries
            state.offset = torch.zeros((), dtype=torch.float32)
        for key, value in state.as_dict(packed=True).items():
            value = value.to("meta") if on_meta else value
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        ours = [k for k in state_dict if k == key or k.startswith(key + ".")]
        # A meta layer cannot be copied into: loading materializes it on the checkpoint's device.
        assign = bool(local_metadata.get("assign_to_params_buffers", False)) or self.weight.is_meta
        # nn.Module loads the bias (and runs hooks); it must not shape-check the packed bytes against ours
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        meta = {**local_metadata, "assign_to_params_buffers": assign}
        super()._load_from_state_dict(rest, prefix, meta, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            if ours:
                error_msgs.append(f"{key} missing, but its quant state is present ({', '.join(sorted(ours))})")
            return  # nn.Module listed it in missing_keys; with strict=False the layer keeps its weight
        if key in missing_keys:
            missing_keys.remove(key)
        try:
            packed, state, unknown = read_packed_4bit(state_dict, key, (self.out_features, self.in_features))
        except ValueError as e:
            error_msgs.append(str(e))
            return
        unexpected_keys.extend(unknown)  # nn.Module.load_state_dict decides what strictness makes of them
        device = packed.device if assign else self.weight.device
        if not assign:  # copy semantics, like nn.Module: the layer never aliases the checkpoint
            packed = packed.to(device, copy=True)
            state = _clone_state(state, device)
        self._set_quantized(packed, state.to(device), where=key)


def read_packed_4bit(
    state_dict: dict[str, Any], key: str, shape: tuple[int, int] | None = None
) -> tuple[torch.Tensor, QuantState, list[str]]:
    """Parse ``key`` and its ``key.*`` quant state from a bitsandbytes-style state dict.

    Returns (packed, state, unknown ``key.*`` entries). Raises ValueError naming the full key of anything
    missing or corrupt; ``shape`` is the expected [out, in] of the weight.
    """
    packed = state_dict[key]
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"{key} is corrupt: expected a tensor, got {type(packed).__name__}")
    stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
    json_names = [n for n in stats if n.startswith("quant_state.")]
    if not json_names:
        hint = ""
        if packed.is_floating_point() and shape is not None and tuple(packed.shape) == tuple(shape):
            hint = " (it holds an unquantized weight; quantize it with Linear4bit.from_linear instead)"
        raise ValueError(f"{key}.{_JSON_PREFIX}nf4 (or __fp4) missing: {key} has no quant state{hint}")
    if len(json_names) > 1:
        raise ValueError(f"{key} has several quant states: {', '.join(f'{key}.{n}' for n in json_names)}")
    jname = json_names[0]
    qtype = jname.removeprefix(_JSON_PREFIX) if jname.startswith(_JSON_PREFIX) else None
    if qtype not in QUANT_TYPES_4BIT:
        raise ValueError(f"{key}.{jname}: unknown quant state; expected {key}.{_JSON_PREFIX}nf4 or __fp4")
    try:
        meta = unpack_json(stats[jname])
    except (ValueError, TypeError, AttributeError) as e:  # JSON and UTF-8 decode errors are ValueErrors
        raise ValueError(f"{key}.{jname} is corrupt: not UTF-8 JSON ({e})") from None
    need = ("quant_type", "blocksize", "dtype", "shape")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ValueError(f"{key}.{jname} is corrupt: the JSON must be an object with {', '.join(need)}")
    if meta["quant_type"] != qtype:
        raise ValueError(f"{key}.{jname} says quant_type {meta['quant_type']!r}, its key says {qtype!r}")
    try:
        wshape = tuple(int(s) for s in meta["shape"])
        check_blocksize(int(meta["blocksize"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key}.{jname} is corrupt: {e}") from None
    if shape is not None and wshape != tuple(shape):
        raise ValueError(f"size mismatch for {key}: the checkpoint weight is {list(wshape)}, the layer {list(shape)}")
    _check_packed_size(packed, math.prod(wshape), key)
    nested = "nested_offset" in meta or "nested_absmax" in stats
    blocks = -(-math.prod(wshape) // int(meta["blocksize"]))
    expected = {
        "absmax": (blocks, torch.uint8 if nested else torch.float32),
        "quant_map": (16, torch.float32),
    }
    if nested:
        nb = -(-blocks // int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))
        expected.update(nested_absmax=(nb, torch.float32), nested_quant_map=(256, torch.float32))
        if "nested_offset" not in meta:
            raise ValueError(f"{key}.{jname} is corrupt: double quantization needs its nested_offset")
    for name, (numel, dtype) in expected.items():
        t = stats.get(name)
        if t is None:
            raise ValueError(f"{key}.{name} missing")
        if not isinstance(t, torch.Tensor) or t.numel() != numel or t.dtype != dtype:
            got = f"{t.dtype} with {t.numel()} entries" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{key}.{name} is corrupt: expected {dtype} with {numel} entries, got {got}")
    unknown = [f"{key}.{n}" for n in stats if n not in expected and n != jname]
    state = QuantState.from_dict({n: stats[n] for n in (*expected, jname)}, where=key)
    return packed, state, unknown


def _check_packed_size(packed: torch.Tensor, numel: int, where: str) -> None:
    if packed.dtype not in STORAGE_DTYPES:
        names = ", ".join(dtype_name(d) for d in STORAGE_DTYPES)
        raise ValueError(f"{where} has dtype {packed.dtype}; packed 4-bit weights are stored as {names}")
    need, have = (numel + 1) // 2, packed.numel() * packed.element_size()
    if not need <= have < need + packed.element_size():  # wider storage dtypes may pad one element
        raise ValueError(f"{where} has {have} bytes, but a 4-bit weight of {numel} elements needs {need}")


def _clone_state(state: QuantState, device: torch.device) -> QuantState:
    tensors = ("absmax", "code", "offset", "nested_absmax", "nested_code")
    copies = {f: getattr(state, f) for f in tensors}
    return replace(state, **{f: None if t is None else t.to(device, copy=True) for f, t in copies.items()})


def _placeholders(
    shape: tuple[int, int],
    quant_type: str,
    blocksize: int,
    nested: bool,
    storage: torch.dtype,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, QuantState]:
    """Uninitialised packed weight and statistics in the shapes and dtypes quantization would give."""
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)
    item = torch.empty((), dtype=storage).element_size()
    packed = torch.empty((-(-((n + 1) // 2) // item), 1), dtype=storage, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    state = QuantState(
        absmax=torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device=device),
        shape=torch.Size(shape),
        dtype=dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=torch.empty(16, **f32),
    )
    if nested:
        state.nested_absmax = torch.empty(-(-blocks // NESTED_BLOCKSIZE), **f32)
        state.nested_code, state.offset = torch.empty(256, **f32), torch.empty((), **f32)
    return packed, state
