"""One LoRA layer for every linear-like base: ``nn.Linear`` or kbit's quantized ``Linear4bit``/``Linear8bit``.

PEFT keeps a LoRA forward per backend (plain, bnb 4-bit, bnb 8-bit, GPTQ, ...) picked by a dispatcher. Here
the base only has to honour one contract, so one class serves them all:

- ``in_features``, ``out_features``, ``bias`` (Parameter or None);
- ``forward(x)`` returns ``x @ W.T + b`` in ``x``'s dtype;
- its weight is ``base.dequantize(dtype)`` (``[out, in]``) when it has that method, else ``base.weight``.

The base is kept as the child ``base_layer`` (PEFT's layout), so its state-dict keys stay the base's own keys
under ``<path>.base_layer.``, and the adapter's keys are PEFT's minus the adapter name:
``<path>.lora_A.weight``, ``<path>.lora_B.weight``, ``<path>.lora_magnitude_vector``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..nn import Linear4bit
from .fused import fusable, lora_linear, row_pieces

INITS = ("kaiming", "gaussian")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a linear-like module whose weight comes from ``dequantize()`` (kbit's Linear4bit/8bit)."""
    return (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and callable(getattr(module, "dequantize", None))
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for a module LoRA can wrap: ``nn.Linear`` or a quantized linear with the dequantize contract."""
    return not isinstance(module, LoRALinear) and (isinstance(module, nn.Linear) or is_quantized_linear(module))


def base_weight(module: nn.Module, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a linear-like module in ``dtype`` (dequantized when quantized); with
    ``rows=(lo, hi)`` only those rows (a kbit ``Linear4bit`` dequantizes only them)."""
    if rows is not None and isinstance(module, Linear4bit):
        return module.dequantize(dtype=dtype, rows=rows)
    if is_quantized_linear(module):
        w = module.dequantize(dtype=dtype).to(dtype)
    else:
        w = module.weight.to(dtype)
    return w if rows is None else w[rows[0] : rows[1]]


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA's multiplier of B A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """A frozen linear-like base plus a trainable low-rank update (LoRA), optionally weight-decomposed (DoRA).

    LoRA:  y = base(x) + s · B A dropout(x),  s = alpha / r  (rsLoRA: alpha / sqrt(r)),
           A [r, in] ~ kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(in))  ("gaussian": N(0, 1/r²)),  B [out, r] = 0.
    DoRA:  y = b + m / ||W + s·B A||_row · (W x + s · B A x),  m [out] initialised to ||W + s·B A||_row.
           The row norm is detached (DoRA paper §4.3, as PEFT does), so it gets no gradient.
    The adapter math runs in the adapter dtype (x is cast to it); the sum is in the base output's dtype.
    With ``enabled`` False the layer computes base(x) alone. With ``fused`` True (:func:`kbit.lora.enable_fused_lora`)
    plain LoRA runs as one autograd node with the base where the dtypes allow (:mod:`kbit.lora.fused`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoRA wraps linear layers only, got {type(base_layer).__name__}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scale = lora_scale(r, alpha, use_rslora)
        # Off: the layer is its base alone (kbit.lora.set_adapter(model, "base")); the adapter's tensors stay.
        self.enabled = True
        # On: base and adapter run as one node (kbit.lora.fused) whenever kbit.lora.fused.fusable holds.
        self.fused = False
        # Set by kbit.lora.group_lora: the siblings reading the same input, run with this one as one node.
        self.group = None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = module_device(base_layer)
        # Initialise in fp32 and cast once, so bf16 and fp32 adapters start from the same (rounded) values.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(dtype)
        self.lora_B.to(dtype)

        if use_dora:
            # m starts at the row norms of the (dequantized) effective weight, so DoRA starts as the identity.
            with torch.no_grad():
                norm = self._row_norm(base_weight(base_layer, torch.float32), self._lora_weight(torch.float32))
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _lora_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """B A as a dense [out, in] matrix."""
        return self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)

    def _row_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        """||W + s·B A|| per output row, [out]."""
        return torch.linalg.norm(weight + self.scale * lora_weight, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.fused and fusable(self, x):
            y = self.group.output(self, x) if self.group is not None else None
            if y is not None:
                return y
            weight = partial(base_weight, self.base_layer)  # called in forward and backward, never stored dense
            return lora_linear(x, weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scale,
                               row_pieces(self.base_layer))  # fmt: skip
        result = self.base_layer(x)
        x = x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is None:
            update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale
        else:
            update = self._dora_update(x, result)
        # Add before casting (as PEFT does) so an fp32 adapter on a bf16 base is rounded once.
        return (result + update).to(result.dtype)

    def _dora_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to base(x): (m/||·|| - 1) · W x + m/||·|| · s · B A x (PEFT's DoraLinearLayer)."""
        with torch.no_grad():  # the norm is a constant to autograd; the dense W is freed right after
            norm = self._row_norm(base_weight(self.base_layer, x.dtype), self._lora_weight(x.dtype))
        factor = (self.lora_magnitude_vector / norm).view(1, -1)  # [1, out]
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result  # W x + b, reused from the base forward
        else:
            # With dropout both DoRA terms see the dropped-out input, so W x needs another pass. Going
            # through the base's own forward (PEFT uses F.linear with the dense W) keeps a quantized base
            # from saving a dense weight per layer for backward.
            x = self.lora_dropout(x)
            base_out = self.base_layer(x.to(result.dtype)).to(x.dtype)
        if self.bias is not None:
            base_out = base_out - self.bias
        return (factor - 1) * base_out + factor * self.lora_B(self.lora_A(x)) * self.scale

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight applied in eval mode: W + s·B A; DoRA: m/||W + s·B A|| · (W + s·B A)."""
        if not self.enabled:
            return base_weight(self.base_layer, dtype)
        weight = base_weight(self.base_layer, dtype) + self.scale * self._lora_weight(dtype)
        if self.lora_magnitude_vector is not None:
            factor = self.lora_magnitude_vector.to(dtype) / torch.linalg.norm(weight, dim=1)
            weight = weight * factor.view(-1, 1)
        return weight

    def extra_repr(self) -> str:
        on = ("" if self.enabled else ", enabled=False") + (", fused=True" if self.fused else "")
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dora={self.use_dora}{on}"
