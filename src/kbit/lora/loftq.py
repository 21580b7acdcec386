"""LoftQ initialisation: quantize a weight and start its LoRA from the quantization residual.

Plain QLoRA starts from ``dequant(quantize(W))`` with ``B = 0``, so training begins with the whole 4-bit error
``W - dequant(Q)``. LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") splits ``W`` between the
4-bit weight and the adapter instead, alternating

    Q_t    = quantize(W - L_{t-1} R_{t-1})               # kbit's NF4/FP4: bitsandbytes' bytes, L_0 R_0 = 0
    L_t R_t = rank-r truncated SVD of W - dequant(Q_t)   # the best rank-r fit of what Q_t missed

and then sets ``B = L / sqrt(s)``, ``A = R / sqrt(s)`` (``s`` the LoRA scale) so that the adapter's first output
is ``s · B A = L R``: the effective weight ``dequant(Q) + s · B A`` is closer to ``W`` than ``dequant(quantize(W))``
is. Storage does not change: ``Q`` is an ordinary :class:`kbit.nn.Linear4bit` (bitsandbytes' format, same bytes per
weight), the low-rank part lives in the adapter that is trained anyway.

One consequence to keep in mind: an adapter trained from a LoftQ start belongs to *that* quantized base (``Q`` is
the quantization of ``W - L R``, not of ``W``). Ship the LoftQ base with it (``kbit quantize``-style checkpoint);
putting it on ``quantize(W)`` or merging it into ``W`` gives a different model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import Linear4bit
from ..quant import QuantState, dequantize_4bit, quantize_4bit
from .layer import LoRALinear


@dataclass
class LoftQResult:
    """What :func:`loftq_decompose` found for one weight ``W`` [out, in]."""

    packed: torch.Tensor  # the 4-bit weight: exactly quantize_4bit(quantized_from, ...)
    state: QuantState
    lora_A: torch.Tensor  # [r, in] float32
    lora_B: torch.Tensor  # [out, r] float32; scale · lora_B @ lora_A is the low-rank part
    quantized_from: torch.Tensor  # the matrix Q encodes: W - (previous low-rank part), in W's dtype
    error_nf4: float  # ||W - dequant(quantize(W))||_F / ||W||_F (plain QLoRA's start)
    errors: list[float] = field(default_factory=list)  # ||W - (dequant(Q_t) + L_t R_t)||_F / ||W||_F per iteration

    @property
    def error(self) -> float:
        """Relative error of the returned (best) iteration."""
        return min(self.errors)


def _low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L R the best rank-r approximation of ``residual``, singular values split evenly.

    The top-r singular vectors come from ``eigh`` of the smaller Gram matrix, several times faster on a CPU than a
    full SVD (1536x576: ~0.1 s vs ~0.5 s); L R = E V V^T is the projection of E on them, the truncated SVD.
    """
    e = residual.float()
    wide = e.shape[0] < e.shape[1]
    sq, vecs = torch.linalg.eigh(e @ e.T if wide else e.T @ e)  # ascending eigenvalues = squared singular values
    v = vecs[:, -r:].flip(1)  # [min(out, in), r], largest first
    root = sq[-r:].flip(0).clamp(min=0).sqrt().sqrt()  # sqrt(sigma)
    inv = torch.where(root > 0, 1 / root, torch.zeros_like(root))
    if wide:  # v = U_r: L = U sqrt(S), R = sqrt(S)^-1 U^T E = sqrt(S) V^T
        return v * root, (v.T @ e) * inv[:, None]
    return (e @ v) * inv, root[:, None] * v.T  # v = V_r: L = E V sqrt(S)^-1 = U sqrt(S), R = sqrt(S) V^T


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor,
    r: int,
    scale: float,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    iters: int = 5,
    quant_storage: torch.dtype = torch.uint8,
) -> LoftQResult:
    """Alternate 4-bit quantization and a rank-``r`` SVD of the residual ``iters`` times; keep the best iteration."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters!r}")
    if not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}, got {r}")
    w = weight.detach().float()
    norm = w.norm().item() or 1.0
    low = torch.zeros_like(w)  # L R of the previous iteration
    best: LoftQResult | None = None
    error_nf4 = float("nan")
    errors: list[float] = []
    for t in range(iters):
        # Quantize from W's own dtype, as load_model does: iteration 0 gives exactly plain QLoRA's bytes.
        target = (w - low).to(weight.dtype)
        packed, state = quantize_4bit(target, quant_type, blocksize, double_quant, quant_storage)
        deq = dequantize_4bit(packed, state, torch.float32)
        if t == 0:
            error_nf4 = (w - deq).norm().item() / norm
        left, right = _low_rank(w - deq, r)
        low = left @ right
        errors.append((w - deq - low).norm().item() / norm)
        if best is None or errors[-1] < best.errors[-1]:
            root = math.sqrt(scale)
            best = LoftQResult(packed, state, right / root, left / root, target, error_nf4, [errors[-1]])
    best.errors = errors
    return best


@torch.no_grad()
def loftq_quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    iters: int = 5,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
) -> dict[str, tuple[float, float]]:
    """Quantize every LoRA layer's dense base LoftQ-style, in place; returns {path: (plain NF4 error, LoftQ error)}.

    ``model`` is a 16-bit model with LoRA already added (``load_model(..., bits=16)`` then ``add_lora``); each
    ``nn.Linear`` base becomes a :class:`Linear4bit` (``compute_dtype``: default the base weight's dtype) and the
    adapter's A and B are overwritten with the LoftQ start, in the adapter's dtype.
    """
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call kbit.add_lora(model, ...) before LoftQ")
    errors: dict[str, tuple[float, float]] = {}
    for path, layer in layers:
        base = layer.base_layer
        if type(base) is not nn.Linear:
            raise ValueError(
                f"{path}: LoftQ quantizes dense bases, but this one is {type(base).__name__}; "
                "load the model with bits=16 and let LoftQ quantize it"
            )
        if layer.use_dora:
            raise ValueError(f"{path}: LoftQ initialisation does not support DoRA adapters; use plain LoRA")
        res = loftq_decompose(base.weight, layer.r, layer.scale, quant_type, blocksize, double_quant, iters,
                              quant_storage)  # fmt: skip
        bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        dtype = compute_dtype or base.weight.dtype
        layer.base_layer = Linear4bit.from_quantized(res.packed, res.state, bias, dtype, quant_storage)
        layer.lora_A.weight.copy_(res.lora_A)
        layer.lora_B.weight.copy_(res.lora_B)
        errors[path] = (res.error_nf4, res.error)  # relative Frobenius errors of the effective weight
    return errors
