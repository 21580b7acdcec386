"""8-bit AdamW: blockwise dynamic 8-bit moments, bitsandbytes' ``AdamW8bit`` semantics, one launch a step.

Each step dequantizes the first moment with the signed dynamic map and the second with the unsigned one
(blocks of 256, :mod:`kbit.quant.blockwise8`), applies AdamW in float32, and requantizes with fresh per-block
absmax. Parameters under ``min_8bit_size`` (4,096) elements keep float32 moments, as bitsandbytes does. The
update and its order of operations are bitsandbytes' CPU backend's (``_optimizer_update_8bit_blockwise_cpu``
and ``_optimizer_update_32bit_cpu``), so on the CPU kbit's steps equal bitsandbytes' byte for byte::

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²;  p = p (1 - lr wd) - (lr / c1) m / (sqrt(v) / c2 + eps)
    (fp32 small tensors: p = p (1 - lr wd) - (lr c2 / c1) m / (sqrt(v) + eps c2))

with c1 = 1 - b1^t, c2 = sqrt(1 - b2^t). On CUDA the 8-bit tensors of each dtype are updated by one Triton
launch over flat state buffers (:mod:`kbit.optim.flat`, :mod:`kbit.kernels.triton.adamw8bit`); the float32
ones by ``torch._foreach`` ops. ``state[p]`` holds ``step``, ``state1``, ``state2`` (and ``absmax1``,
``absmax2``) named and shaped as in bitsandbytes; ``state_dict()`` returns standalone copies.

What depends only on the parameter set (which tensors, which have gradients, their grouping by step, the flat
buffers and kernel tables) is built when that set changes (:mod:`kbit.optim.plan`, :mod:`kbit.optim.fused`);
a step reads each ``.grad``, counts steps and enqueues the launch, without waiting for the GPU."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from ..kernels.dispatch import use_triton
from ..quant.blockwise8 import dequantize_blockwise, quantize_blockwise
from ..quant.codebooks import dynamic_map, lut_8bit
from .flat import BLOCK, FlatStates, blocks_of, build_layout, standalone_state_dict, synchronize
from .fused import FusedUpdate
from .plan import Batch, ParamSet, groups_key

MIN_8BIT_SIZE = 4096
STATE8_SPECS = {
    "state1": (torch.uint8, True),
    "state2": (torch.uint8, True),
    "absmax1": (torch.float32, False),
    "absmax2": (torch.float32, False),
}


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise a ValueError naming the first out-of-range AdamW hyperparameter."""
    if not lr >= 0.0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def adamw8bit_update_(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    group: dict,
    code1: torch.Tensor,
    code2: torch.Tensor,
    sqrt: Callable[[torch.Tensor], torch.Tensor] = torch.sqrt,
) -> None:
    """One AdamW step on ``p`` with 8-bit ``state`` (step already counted), in bitsandbytes' CPU order.

    ``sqrt`` lets tests swap torch's CPU square root (not correctly rounded) for the GPU kernel's IEEE one.
    """
    b1, b2 = group["betas"]
    lr, eps, wd, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
    m = dequantize_blockwise(state["state1"], state["absmax1"], code1, BLOCK)
    v = dequantize_blockwise(state["state2"], state["absmax2"], code2, BLOCK)
    g32 = g.float()
    m.mul_(b1).add_(g32, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1.0 - b2)
    c1 = 1.0 - b1**step
    c2 = math.sqrt(1.0 - b2**step)
    denom = (sqrt(v) / c2).add_(eps)
    p32 = p.float()  # p itself when float32
    if wd > 0.0:
        p32.mul_(1.0 - lr * wd)
    p32.addcdiv_(m, denom, value=-lr / c1)
    if p32 is not p:
        p.copy_(p32)
    for x, code, s, a in ((m, code1, "state1", "absmax1"), (v, code2, "state2", "absmax2")):
        q, absmax = quantize_blockwise(x, code, BLOCK)
        state[s].copy_(q)
        state[a].copy_(absmax)


def adam32_update_(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict, step: int
) -> None:
    """One AdamW step on parameters with float32 moments, all at ``step``, in bitsandbytes' 32-bit order."""
    b1, b2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    m = [s["state1"] for s in states]
    v = [s["state2"] for s in states]
    g32 = [g.float() for g in grads]
    p32 = [p.float() for p in params]
    torch._foreach_mul_(m, b1)
    torch._foreach_add_(m, g32, alpha=1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g32, g32, value=1.0 - b2)
    c1 = 1.0 - b1**step
    c2 = math.sqrt(1.0 - b2**step)
    if wd > 0.0:
        torch._foreach_mul_(p32, 1.0 - lr * wd)
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps * c2)
    torch._foreach_add_(p32, torch._foreach_div(m, denom), alpha=-lr * c2 / c1)
    for p, q in zip(params, p32, strict=True):
        if q is not p:
            p.copy_(q)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise moments (bitsandbytes' AdamW8bit); float32 ones under 4,096 elements."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = int(min_8bit_size)
        self._codes: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._reset_plan()

    def _reset_plan(self) -> None:
        # Everything below depends only on the parameter set; rebuilt when it changes (see kbit.optim.plan).
        self._params: ParamSet | None = None
        self._fusion: FusedUpdate | None = None  # fused path: flat 8-bit states per parameter dtype
        self._use_fused = False
        self._small: list[tuple[Batch, list[int]]] = []  # float32-state parameters of each batch
        self._large: list[tuple[Batch, list[int]]] = []  # 8-bit ones (reference path)

    @property
    def _buckets(self) -> dict:
        return self._fusion.buckets if self._fusion is not None else {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(signed map, unsigned map, signed bin->code table, unsigned table) on ``device``, cached."""
        if device not in self._codes:
            code1, code2 = dynamic_map(True, device), dynamic_map(False, device)
            self._codes[device] = (code1, code2, lut_8bit(code1, device), lut_8bit(code2, device))
        return self._codes[device]

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
        elif not self._fused(p):  # the fused path allocates 8-bit states in flat buffers instead
            nb = blocks_of(p.numel())
            state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
            state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)

    def _fused(self, p: torch.Tensor) -> bool:
        return use_triton(p)

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> FlatStates:
        return FlatStates(build_layout(params, device), STATE8_SPECS, device)

    def _param_set(self) -> ParamSet:
        """The cached parameter set, rebuilt when the param groups (or their parameters) changed."""
        if self._params is None or self._params.key != groups_key(self.param_groups):
            fusion = self._fusion  # its buckets hold the 8-bit state: kept across a change of the groups
            self._reset_plan()
            self._fusion = fusion
            self._params = ParamSet(self)
        return self._params

    def _activate(self, ps: ParamSet) -> None:
        """The set of parameters with gradients changed: initialise state, regroup, (re)build the buckets."""
        first = ps.first_with_grad()
        self._use_fused = first is not None and self._fused(first)
        ps.activate(self.state, self._init_state, lambda s: s["step"], contiguous=self._use_fused)
        small = {i for i in ps.active if ps.params[i].numel() < self.min_8bit_size}
        self._small = [(b, idx) for b in ps.batches if (idx := [i for i in b.indices if i in small])]
        self._large = [(b, idx) for b in ps.batches if (idx := [i for i in b.indices if i not in small])]
        if self._use_fused and self._large:
            if self._fusion is None:
                self._fusion = FusedUpdate(self._new_bucket, self._tables(first.device), torch_order=False)
            self._fusion.activate(self, ps, [i for _, idx in self._large for i in idx])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps = self._param_set()
        if not ps.ready(self._activate):
            return loss
        for s in ps.states:
            s["step"] += 1
        if self._use_fused:
            if self._large:
                self._fusion.step(ps)
        else:
            code1, code2, _, _ = self._tables(ps.params[ps.active[0]].device)
            for batch, idx in self._large:
                for i in idx:
                    p = ps.params[i]
                    adamw8bit_update_(p, ps.grads[i], self.state[p], batch.group, code1, code2)
        for batch, idx in self._small:
            params = [ps.params[i] for i in idx]
            grads = [ps.grads[i] for i in idx]
            adam32_update_(params, grads, [self.state[p] for p in params], batch.group, batch.step)
        return loss

    def state_dict(self) -> dict:
        """torch's optimizer state dict, every state tensor a standalone copy (not a view of flat buffers)."""
        return standalone_state_dict(self, self._buckets)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of :meth:`state_dict` (or bitsandbytes' AdamW8bit) without casting any state."""
        synchronize(self._buckets)
        self._reset_plan()
        saved = state_dict["state"]
        # torch's loader would cast uint8 codes and fp32 absmax to the parameter dtype: load groups only.
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        ids = {
            pid: p
            for sg, g in zip(state_dict["param_groups"], self.param_groups, strict=True)
            for pid, p in zip(sg["params"], g["params"], strict=True)
        }
        self.state = defaultdict(dict)
        for pid, s in saved.items():
            if pid not in ids:
                raise ValueError(f"state dict has state for parameter id {pid}, which none of its param groups lists")
            p = ids[pid]
            sizes = {"state1": p.numel(), "state2": p.numel(), "absmax1": blocks_of(p.numel())}
            sizes["absmax2"] = sizes["absmax1"]
            loaded = {n: s[n] for n in sizes if n in s}
            for n, t in loaded.items():
                if t.numel() != sizes[n]:
                    raise ValueError(
                        f"state {n!r} has {t.numel()} elements but the parameter of shape {tuple(p.shape)}"
                        f" needs {sizes[n]}: the state dict does not belong to these parameters"
                    )
            self.state[p] = {
                n: t.detach().reshape(p.shape if n.startswith("state") else -1).to(p.device, copy=True)
                for n, t in loaded.items()
            }
            self.state[p]["step"] = int(s["step"])
