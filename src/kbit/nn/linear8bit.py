"""Linear8bit: a frozen LLM.int8 row-wise linear in bitsandbytes' ``Linear8bitLt`` state-dict format
(``has_fp16_weights=False``): ``weight`` int8 [out, in], ``SCB`` float32 [out] and ``weight_format``
uint8 0 ("row").

The forward is weight-only: ``W = CB * SCB / 127`` is dequantized to ``compute_dtype`` and multiplied in
floating point. bitsandbytes' ``Linear8bitLt`` also quantizes the *activations* to int8 per row (and,
with a threshold, splits outlier input columns off into fp16); kbit does neither, so there is no outlier
decomposition to configure: its output is the product with the dequantized weight, bitsandbytes' carries
activation rounding on top. Device moves, dtype safety, construction and loading follow
:mod:`kbit.nn.linear4bit`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from ..quant import dequantize_int8_rowwise, quantize_int8_rowwise
from ..quant.state import dtype_name
from ..quant.validate import check_out_dtype
from .functional import apply_keeping_dtype, dequant_linear, linear_bias

_ROW_FORMAT = 0  # bitsandbytes' code for its only remaining layout, "row"


class Linear8bit(nn.Module):
    """``y = x @ (CB * SCB / 127)^T + b`` with the int8 weight frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_out_dtype(compute_dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        dev = torch.empty(0, device=device).device  # honours `with torch.device(...)` when device is None
        if dev.type == "meta":
            cb = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=dev)
            scb = torch.empty(self.out_features, dtype=torch.float32, device=dev)
        else:
            w = torch.empty(self.out_features, self.in_features, device=dev)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's initialisation
            cb, scb = quantize_int8_rowwise(w)
        self.weight = nn.Parameter(cb, requires_grad=False)
        self.register_buffer("SCB", scb)  # persistent: bitsandbytes saves it as `<prefix>SCB`
        self.register_parameter("bias", linear_bias(self.in_features, self.out_features, dev) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Linear8bit:
        """Quantize ``linear.weight`` row-wise once (on its device) and copy its bias."""
        layer = cls(linear.in_features, linear.out_features, False, compute_dtype, device="meta")
        if not linear.weight.is_meta:
            cb, scb = quantize_int8_rowwise(linear.weight.detach())
            layer.weight, layer.SCB = nn.Parameter(cb, requires_grad=False), scb
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        cb: torch.Tensor,
        scb: torch.Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear8bit:
        """Wrap existing int8 codes [out, in] and float32 row scales [out] without copying them."""
        _check_int8(cb, scb, "cb", "scb", None)
        layer = cls(cb.shape[1], cb.shape[0], False, compute_dtype, device="meta")
        layer.weight, layer.SCB = nn.Parameter(cb, requires_grad=False), scb.to(cb.device)
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out_features, in_features] in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_int8_rowwise(self.weight, self._scales(), out_dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` computed in ``compute_dtype``, returned in ``x.dtype``; no state is modified."""
        dequant = partial(dequantize_int8_rowwise, self.weight, self._scales())
        return dequant_linear(x, dequant, self.bias, self.compute_dtype)

    def _scales(self) -> torch.Tensor:
        # A cast that bypassed _apply would have rounded the scales; dequantize_int8_rowwise checks the codes.
        if self.SCB.dtype != torch.float32:
            raise RuntimeError(f"SCB is {self.SCB.dtype}, not float32: it was cast and lost precision")
        return self.SCB

    def _apply(self, fn, recurse: bool = True):
        # SCB is float32 by format: `.half()` must not round it (nn.Module never casts the int8 weight)
        return super()._apply(apply_keeping_dtype(fn, [self.weight, self.SCB]), recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={dtype_name(self.compute_dtype)}"
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias, SCB
        # bitsandbytes writes a CPU uint8 scalar whatever the layer's device
        destination[prefix + "weight_format"] = torch.tensor(_ROW_FORMAT, dtype=torch.uint8)

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
        fmt_key, w_key, scb_key = prefix + "weight_format", prefix + "weight", prefix + "SCB"
        rest = {k: v for k, v in state_dict.items() if k != fmt_key}
        try:
            _check_format(state_dict.get(fmt_key, _ROW_FORMAT), fmt_key)
            if w_key in state_dict or scb_key in state_dict:
                if w_key not in state_dict or scb_key not in state_dict:
                    have, lack = (w_key, scb_key) if w_key in state_dict else (scb_key, w_key)
                    raise ValueError(f"{lack} missing ({have} is present; an int8 weight needs both)")
                shape = (self.out_features, self.in_features)
                _check_int8(state_dict[w_key], state_dict[scb_key], w_key, scb_key, shape)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        # A meta layer cannot be copied into: loading materializes it on the checkpoint's device.
        meta = dict(local_metadata)
        if self.weight.is_meta:
            meta["assign_to_params_buffers"] = True
        super()._load_from_state_dict(rest, prefix, meta, strict, missing_keys, unexpected_keys, error_msgs)


def _check_format(fmt: Any, key: str) -> None:
    value = fmt.item() if isinstance(fmt, torch.Tensor) else fmt
    if value not in (_ROW_FORMAT, "row"):
        raise ValueError(f"{key} is {value!r}: only the row-major layout (0, 'row') is supported")


def _check_int8(cb: Any, scb: Any, cb_name: str, scb_name: str, shape: tuple[int, int] | None) -> None:
    """Raise a ValueError naming the entry unless cb is int8 [out, in] and scb float32 [out]."""
    if not isinstance(cb, torch.Tensor) or cb.dtype != torch.int8 or cb.dim() != 2:
        got = f"{cb.dtype} {list(cb.shape)}" if isinstance(cb, torch.Tensor) else type(cb).__name__
        hint = " (an unquantized weight? use Linear8bit.from_linear)" if "float" in got else ""
        raise ValueError(f"{cb_name} must be an int8 [out, in] tensor, got {got}{hint}")
    if shape is not None and tuple(cb.shape) != tuple(shape):
        raise ValueError(
            f"size mismatch for {cb_name}: the checkpoint weight is {list(cb.shape)}, the layer {list(shape)}"
        )
    if not isinstance(scb, torch.Tensor) or scb.dtype != torch.float32 or scb.shape != (cb.shape[0],):
        got = f"{scb.dtype} {list(scb.shape)}" if isinstance(scb, torch.Tensor) else type(scb).__name__
        raise ValueError(f"{scb_name} is corrupt: expected float32 [{cb.shape[0]}], got {got}")
