"""LoRA fused with its frozen base projection: one autograd node per adapted linear instead of four modules.

Unfused, ``y = base(x) + s · B(A(x))`` writes three full [M, out] tensors besides the base output (B's product,
its scaling by s, the sum) and the backward two more (dy · s, and autograd's sum of the base's and the adapter's
input gradients). In a Llama-3-8B QLoRA step on an H100 (8 x 2048 tokens) those elementwise passes took ~175 ms of
1,150. Here the additions happen inside the GEMMs (``addmm`` with beta = 1: one kernel, one rounding) and s scales
only rank-r results:

    forward   y  = x W^T (+ b) + s · (x A^T) B^T         xa = x A^T [M, r] is kept for dB
    backward  g  = dy B                                  [M, r]
              dx = dy W + s · g A                        accumulated into dy W in place
              dA = s · g^T x                             [r, in]
              dB = s · dy^T xa                           [out, r]

W is never saved: like :class:`kbit.nn.functional.DequantLinear` the node keeps a dequantizer and rebuilds W in the
backward, so activation memory is x and xa only (x is what A's gradient needs in the unfused path too).

The fused node runs only where it computes the unfused layer's function at the same dtypes (:func:`fusable`): no
active dropout (its mask would have to be saved), no DoRA, adapter on, a kbit ``Linear4bit``/``Linear8bit`` or a
plain frozen ``nn.Linear`` base, and x, the adapter and the base's compute all in one dtype (under autocast: the
autocast dtype). Anything else takes the unfused path, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..nn import Linear4bit, Linear8bit

# (dtype, rows=None) -> the frozen weight [out, in] in that dtype, or only rows lo..hi of it
DenseWeight = Callable[..., torch.Tensor]
Pieces = tuple[tuple[int, int], ...] | None  # row ranges the weight is rebuilt in, one at a time (None: whole)


def row_pieces(base: nn.Module) -> Pieces:
    """The row ranges ``base``'s weight is dequantized in by the fused nodes (its ``dequant_rows``, a memory plan's
    choice: one piece's dense rows alive at a time instead of the whole weight), or None for the whole weight."""
    rows = getattr(base, "dequant_rows", None)
    n = base.out_features
    if not rows or rows >= n:
        return None
    return tuple((lo, min(lo + rows, n)) for lo in range(0, n, rows))


def _by_rows(dequant: DenseWeight, dtype: torch.dtype) -> Callable:
    # rows -> W's rows in dtype; a whole weight is asked for without ``rows`` (any dtype -> W callable works)
    return lambda rows: dequant(dtype) if rows is None else dequant(dtype, rows=rows)


def linear_pieces(
    x2: torch.Tensor, weight: Callable, bias: torch.Tensor | None, pieces: Pieces, n: int
) -> torch.Tensor:
    """``x2 W^T + b`` [M, n] with W built by ``weight(rows)`` one row piece at a time, each piece's GEMM writing
    its own output columns (``pieces`` None: the whole W at once)."""
    if pieces is None:
        return F.linear(x2, weight(None), bias)
    y = x2.new_empty((x2.shape[0], n))
    for lo, hi in pieces:
        w = weight((lo, hi))
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, lo:hi])
        else:
            torch.addmm(bias[lo:hi], x2, w.t(), out=y[:, lo:hi])
        del w  # before the next piece is built
    return y


def input_grad_pieces(dy2: torch.Tensor, weight: Callable, pieces: Pieces, out: torch.Tensor | None = None):
    """``dy2 W`` (added to ``out`` in place when given) with W built one row piece at a time (None: whole)."""
    for rows in (None,) if pieces is None else pieces:
        w = weight(rows)
        part = dy2 if rows is None else dy2[:, rows[0] : rows[1]]
        out = part @ w if out is None else out.addmm_(part, w)
        del w
    return out


class LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s · (x A^T) B^T`` with ``W = dequant(x.dtype)`` frozen; gradients for x, b, A and B."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, dequant: DenseWeight, scale: float, pieces: Pieces = None):
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        x2 = x.reshape(-1, x.shape[-1])  # [M, in]
        y = linear_pieces(x2, _by_rows(dequant, x.dtype), bias, pieces, lora_b.shape[0])  # [M, out]
        xa = x2 @ lora_a.t()  # [M, r]
        if _get_current_dispatch_mode() is None:
            y.addmm_(xa, lora_b.t(), alpha=scale)  # the LoRA sum in the GEMM's epilogue
        else:
            # Selective checkpointing (a dispatch mode) caches y and refuses it mutated; out of place, addmm copies
            # y into its result first, one [M, out] pass that the in-place form avoids.
            y = torch.addmm(y, xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x if need_a else None, xa if need_b else None, lora_a if need_x else None, lora_b)
        ctx.dequant, ctx.scale, ctx.pieces = dequant, scale, pieces
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        s = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, out]
        dx = dbias = da = db = None
        g = dy2 @ lora_b if need_x or need_a else None  # [M, r]
        if need_x:
            dx = input_grad_pieces(dy2, _by_rows(ctx.dequant, dy.dtype), ctx.pieces)  # [M, in]
            dx.addmm_(g, lora_a, alpha=s)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if need_a:
            da = (g.t() @ x.reshape(-1, x.shape[-1])).mul_(s)  # [r, in]
        if need_b:
            db = (dy2.t() @ xa).mul_(s)  # [out, r]
        if need_bias:
            dbias = dy2.sum(0)
        return dx, dbias, da, db, None, None, None


def lora_linear(
    x: torch.Tensor,
    dequant: DenseWeight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    pieces: Pieces = None,
) -> torch.Tensor:
    """``x W^T + b + scale · x A^T B^T`` in ``x.dtype`` as one autograd node, W from ``dequant`` (never saved;
    rebuilt in the row ``pieces`` when given, one at a time)."""
    bias = None if bias is None else bias.to(x.dtype)  # differentiable; the stored bias is not rewritten
    return LoRALinearFunction.apply(x, bias, lora_a, lora_b, dequant, scale, pieces)


def _supported_base(base: nn.Module) -> bool:
    # Subclasses of nn.Linear may compute something else in forward; kbit's quantized layers are x W^T + b.
    if isinstance(base, (Linear4bit, Linear8bit)):
        return True
    return type(base) is nn.Linear and not base.weight.requires_grad  # a trainable W would need its gradient


def _base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a supported base computes in outside autocast."""
    return base.compute_dtype if isinstance(base, (Linear4bit, Linear8bit)) else base.weight.dtype


def _static_fusable(layer: nn.Module) -> bool:
    """The conditions that do not depend on the input: adapter on, plain LoRA, no active dropout, known base."""
    dropout_off = isinstance(layer.lora_dropout, nn.Identity) or not layer.training
    return layer.enabled and not layer.use_dora and dropout_off and _supported_base(layer.base_layer)


def fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    """True when the fused node computes this LoRALinear's function on ``x`` at the unfused path's dtypes."""
    if not _static_fusable(layer):
        return False
    dtype, base = x.dtype, layer.base_layer
    if layer.lora_A.weight.dtype != dtype or layer.lora_B.weight.dtype != dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        if torch.get_autocast_dtype(x.device.type) != dtype:
            return False
        # Autocast casts a plain base's weight and bias to x's dtype; a quantized base computes in compute_dtype.
        return type(base) is nn.Linear or base.compute_dtype == dtype
    bias_ok = base.bias is None or base.bias.dtype == dtype or type(base) is not nn.Linear
    return _base_dtype(base) == dtype and bias_ok


def enable_fused_lora(model: nn.Module, on: bool = True) -> int:
    """Set every LoRALinear's ``fused`` flag; returns how many will run fused (0 when ``on`` is False).

    Counted: layers with a supported base, no DoRA, no dropout and adapters in the base's compute dtype (the
    others keep the unfused path, as does any call whose input dtype or autocast state does not match).
    """
    from .layer import LoRALinear  # layer.py imports this module

    count = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.fused = on
            adapter_dtype = module.lora_A.weight.dtype
            no_dropout = isinstance(module.lora_dropout, nn.Identity)
            if on and no_dropout and _static_fusable(module) and _base_dtype(module.base_layer) == adapter_dtype:
                count += 1
    return count
