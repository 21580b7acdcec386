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
``absmax2``) named and shaped as in bitsandbytes; ``state_dict()`` returns standalone copies."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from ..kernels.dispatch import use_triton
from ..quant.blockwise8 import dequantize_blockwise, quantize_blockwise
from ..quant.codebooks import dynamic_map, lut_8bit
from .flat import (
    BLOCK,
    Chunk,
    FlatStates,
    blocks_of,
    build_layout,
    param_table,
    scalar_row,
    standalone_state_dict,
    synchronize,
    to_device,
)

MIN_8BIT_SIZE = 4096
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE8_NAMES = ("state1", "state2", "absmax1", "absmax2")
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


def params_with_grad(optimizer: torch.optim.Optimizer) -> list[tuple[dict, torch.Tensor]]:
    """(group, param) for every parameter with a gradient; raises on sparse gradients and mixed devices."""
    name = type(optimizer).__name__
    out, devices = [], {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients ({where}); use dense ones")
            devices.setdefault(p.device, where)
            out.append((group, p))
    if len(devices) > 1:
        found = ", ".join(f"{d} ({w})" for d, w in devices.items())
        raise RuntimeError(f"{name} needs all parameters on one device, found {found}; move the model first")
    return out


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


class DeviceStates:
    """Flat 8-bit states of one parameter dtype kept on the GPU: the whole layout is one chunk, one launch."""

    def __init__(self, params: list[torch.Tensor], device: torch.device, specs: dict):
        """Zero-initialised buffers for ``params`` on ``device``."""
        self.flat = FlatStates(build_layout(params, device), specs, device)

    def run(self, launch: Callable[[dict[str, torch.Tensor], Chunk], None]) -> None:
        """Call ``launch(buffers, chunk)`` once for the single chunk."""
        launch(self.flat.buffers, self.flat.layout.chunks[0])

    def synchronize(self) -> None:
        """Nothing is in flight outside the current stream."""


def rebuild_buckets(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], new_bucket: Callable
) -> dict[torch.dtype, DeviceStates]:
    """Flat state buckets (one per parameter dtype) for ``params``, holding the state they already have."""
    for b in getattr(optimizer, "_buckets", {}).values():
        b.synchronize()  # paged: the host copies of the old buffers must be complete before they are read
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(optimizer).__name__} updates {FLOAT_DTYPES} parameters, got {p.dtype}")
        by_dtype[p.dtype].append(p)
    buckets = {dt: new_bucket(ps, ps[0].device) for dt, ps in by_dtype.items()}
    for bucket in buckets.values():
        bucket.flat.adopt([optimizer.state[p] for p in bucket.flat.layout.params])
    return buckets


def fused_step(
    buckets: dict[torch.dtype, DeviceStates],
    active: list[tuple[dict, torch.Tensor]],
    steps: dict[int, int],
    tables: tuple[torch.Tensor, ...] | None,
    names: tuple[str, str, str | None, str | None],
) -> None:
    """One AdamW step of the bucket parameters in ``active`` (steps already counted), one launch a chunk.

    ``tables`` (maps, bin tables) selects 8-bit states in bitsandbytes' order; None, moments in torch's order.
    """
    from ..kernels.triton.adamw8bit import adamw_tiles

    group_of = {id(p): g for g, p in active}
    for dtype, bucket in buckets.items():
        layout = bucket.flat.layout
        device = layout.tiles.device
        rows: dict[tuple[int, int], int] = {}
        scalars, row_of, grads = [], [], []
        for p in layout.params:
            group = group_of.get(id(p))
            if group is None:  # no gradient this step: the kernel skips the parameter
                grads.append(None)
                row_of.append(0)
                continue
            if not (p.is_contiguous() and p.grad.is_contiguous()) or p.grad.dtype != dtype:
                raise RuntimeError(
                    f"the fused AdamW needs contiguous parameters with gradients of their dtype"
                    f" (shape {tuple(p.shape)}, {p.dtype}, gradient {p.grad.dtype})"
                )
            grads.append(p.grad)
            key = (id(group), steps[id(p)])
            if key not in rows:
                rows[key] = len(scalars)
                hp = (group["betas"], group["eps"], group["lr"], group["weight_decay"])
                scalars.append(scalar_row(*hp, key[1], torch_order=tables is None))
            row_of.append(rows[key])
        if not scalars:
            continue
        ptable = param_table(layout, grads, row_of, device)
        stable = to_device(torch.tensor(scalars, dtype=torch.float32), device)

        def launch(
            bufs: dict[str, torch.Tensor],
            chunk: Chunk,
            layout=layout,
            ptable=ptable,
            stable=stable,
            dtype=dtype,
        ):
            states = tuple(bufs[n] if n is not None else None for n in names)
            adamw_tiles(
                layout.tiles,
                ptable,
                stable,
                states,
                tables,
                dtype,
                tile0=chunk.tile0,
                ntiles=chunk.tile1 - chunk.tile0,
                blk_base=chunk.block0,
            )

        bucket.run(launch)


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
        self._buckets: dict[torch.dtype, DeviceStates] = {}  # fused path: flat states per parameter dtype
        self._codes: dict[torch.device, tuple[torch.Tensor, ...]] = {}

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

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> DeviceStates:
        return DeviceStates(params, device, STATE8_SPECS)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = params_with_grad(self)
        if not active:
            return loss
        for _, p in active:
            if not self.state[p]:
                self._init_state(p)
            self.state[p]["step"] += 1
        small = [(g, p) for g, p in active if p.numel() < self.min_8bit_size]
        large = [(g, p) for g, p in active if p.numel() >= self.min_8bit_size]
        if self._fused(active[0][1]):
            self._step_fused(large)
        else:
            code1, code2, _, _ = self._tables(active[0][1].device)
            for group, p in large:
                adamw8bit_update_(p, p.grad, self.state[p], group, code1, code2)
        self._step_small(small)
        return loss

    def _step_small(self, small: list[tuple[dict, torch.Tensor]]) -> None:
        # One batch of foreach ops per (group, step): the scalars are shared by the batch.
        batches: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
        groups = {}
        for group, p in small:
            key = (id(group), self.state[p]["step"])
            groups[key] = group
            batches[key].append(p)
        for key, ps in batches.items():
            adam32_update_(ps, [p.grad for p in ps], [self.state[p] for p in ps], groups[key], key[1])

    def _sync_buckets(self, large: list[tuple[dict, torch.Tensor]]) -> None:
        """(Re)build the flat buffers when a parameter needs 8-bit state that they do not hold yet."""
        held = {id(p) for b in self._buckets.values() for p in b.flat.layout.params}
        if all(id(p) in held for _, p in large):
            return
        needed = {id(p) for _, p in large} | held
        params = [p for g in self.param_groups for p in g["params"] if id(p) in needed]
        self._buckets = rebuild_buckets(self, params, self._new_bucket)

    def _step_fused(self, large: list[tuple[dict, torch.Tensor]]) -> None:
        if not large:
            return
        self._sync_buckets(large)
        tables = self._tables(large[0][1].device)
        fused_step(self._buckets, large, {id(p): self.state[p]["step"] for _, p in large}, tables, STATE8_NAMES)

    def state_dict(self) -> dict:
        """torch's optimizer state dict, every state tensor a standalone copy (not a view of flat buffers)."""
        return standalone_state_dict(self, self._buckets)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of :meth:`state_dict` (or bitsandbytes' AdamW8bit) without casting any state."""
        synchronize(self._buckets)
        self._buckets = {}
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
