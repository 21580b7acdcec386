"""LoRA projections that read one input (q/k/v, gate/up) as one autograd node, the adapters inside the base GEMMs.

Fused per projection (:mod:`kbit.lora.fused`) an adapter still costs memory-bound passes over full-size tensors:
the forward's ``y += s·xa B^T`` reads and writes y, the backward's ``dx += s·g A`` reads and writes dx, x is read
once per projection for ``x A^T`` and again for A's gradient, and autograd sums the group's input gradients. In a
Llama-3-8B step at 8 x 2048 tokens on an H100 these passes are ~125 ms of ~1,060.

A group widens its shared input by the adapters instead. With ``xa = x [A_1; ...; A_n]^T`` (one GEMM, R = sum of
the ranks) and K the input width:

    X    = [x | xa | 0]                      K + R columns, zero-padded to a multiple of 64 (the GEMMs' K tiles)
    W_i' = [W_i | 0 .. s_i B_i .. 0]         B_i in the columns of its own slot of xa
    y_i  = X W_i'^T (+ b_i)                  the base projection and its adapter in one GEMM, one rounding

and the backward is its transpose:

    dX   = sum_i dy_i W_i'                   one GEMM per projection, accumulated in place: [sum_i dy_i W_i | s_i g_i]
    dA   = dX[:, slots]^T x                  one GEMM for the group (x read once)
    dB_i = s_i dy_i^T xa_i
    dx   = dX[:, :K] + dX[:, slots] A        one rank-R GEMM for the group; handed back as a view of dX

The extra columns cost R/K more FLOPs in the base GEMMs (1.6% at r = 16 for q/k/v). W_i' is rebuilt in forward
and backward (the dequantizer writes W_i straight into its first K columns) and never saved; the node saves X,
which holds x and xa as the per-projection nodes save them. It runs where every member would run fused
(:func:`kbit.lora.fused.fusable`) on a kbit ``Linear4bit`` base; anything else, or a dispatch mode such as selective
checkpointing (which caches op outputs and would have to see the in-place accumulation), takes the per-projection
path.

When the shared input is an RMSNorm output the fast path made with spare columns (:func:`kbit.kernels.rms_norm`'s
``spare_cols``, set per family by :func:`kbit.models.patch.apply_fast_path`), X is that buffer and x is not copied.

The model calls the members one at a time (``self.q_proj(x)``, then k, then v), so the first member called runs the
whole group and keeps the others' outputs for their calls on the same ``x``: same tensor object, unchanged since,
with the same adapter weights and grad mode. Any other call recomputes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..nn import Linear4bit
from .fused import fusable, input_grad_pieces, linear_pieces, row_pieces

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same input
K_ALIGN = 64  # the widened input's width is padded to this (cuBLAS's K tiles; 16-byte aligned rows)


def _wide_weight(
    base: Linear4bit,
    lora_b: torch.Tensor,
    scale: float,
    lo: int,
    width: int,
    dtype,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """W' = [W | 0 .. scale·B (columns lo..) .. 0], [out, width] in ``dtype``; with ``rows=(a, b)`` only W's rows
    a..b (a memory plan's row pieces, :func:`kbit.lora.fused.row_pieces`)."""
    k = base.in_features
    a, b = rows if rows is not None else (0, base.out_features)
    w = torch.empty((b - a, width), dtype=dtype, device=lora_b.device)
    base.dequantize(dtype, out=w[:, :k], rows=rows)
    w[:, k:].zero_()
    w[:, lo : lo + lora_b.shape[1]] = lora_b[a:b].to(dtype) * scale
    return w


def group_width(k: int, ranks: list[int]) -> int:
    """Columns of the widened input: K plus the ranks, padded to a multiple of :data:`K_ALIGN`."""
    return -(-(k + sum(ranks)) // K_ALIGN) * K_ALIGN


def _spare_columns(x2: torch.Tensor, width: int) -> torch.Tensor | None:
    """The widened input in place: ``x2`` [M, K] already sits in the first columns of rows ``width`` wide whose
    other columns are scratch (an RMSNorm output made with ``spare_cols``, or a row range of one); else None."""
    base = x2._base
    if base is None or getattr(base, "kbit_spare_from", None) != x2.shape[1] or base.stride() != (width, 1):
        return None
    if x2.stride() != (width, 1) or (x2.storage_offset() - base.storage_offset()) % width:
        return None
    # Through .data: writing the scratch columns changes no value of x or of any tensor autograd tracks, and must
    # not bump x's version (autograd forbids in-place changes to views made inside a custom Function, the norm's).
    return base.data.as_strided((x2.shape[0], width), (width, 1), x2.storage_offset())


class GroupedLoRAFunction(torch.autograd.Function):
    """``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T`` for every member i, as one node (module docstring)."""

    @staticmethod
    def forward(ctx, x, bases, scales, *tensors):
        n = len(bases)
        biases, lora_as, lora_bs = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        ctx.set_materialize_grads(False)  # an unused output (k without v, say) gets no gradient pass
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        ranks = [a.shape[0] for a in lora_as]
        width = group_width(k, ranks)
        wide = _spare_columns(x2, width)
        if wide is None:
            wide = torch.empty((x2.shape[0], width), dtype=x.dtype, device=x.device)
            wide[:, :k] = x2
        wide[:, k : k + sum(ranks)] = x2 @ torch.cat(lora_as).t()  # xa of every member, one GEMM
        wide[:, k + sum(ranks) :].zero_()
        ys, lo = [], k
        for base, bias, lora_b, scale in zip(bases, biases, lora_bs, scales, strict=True):
            build = functools.partial(_wide_weight, base, lora_b, scale, lo, width, x.dtype)
            y = linear_pieces(wide, build, bias, row_pieces(base), base.out_features)
            ys.append(y.view(*x.shape[:-1], y.shape[-1]))
            lo += lora_b.shape[1]
        ctx.save_for_backward(wide, *lora_as, *lora_bs)
        ctx.bases, ctx.scales, ctx.k, ctx.ranks = bases, scales, k, ranks
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n, k, ranks = len(ctx.bases), ctx.k, ctx.ranks
        wide, *ab = ctx.saved_tensors
        lora_as, lora_bs = ab[:n], ab[n:]
        need = ctx.needs_input_grad
        need_x = need[0]
        rank = sum(ranks)
        los = [k + sum(ranks[:i]) for i in range(n)]
        dy2s = [None if dy is None else dy.reshape(-1, dy.shape[-1]) for dy in dys]
        m, width = wide.shape
        dwide = None
        if need_x:
            for base, dy2, lora_b, scale, lo in zip(ctx.bases, dy2s, lora_bs, ctx.scales, los, strict=True):
                if dy2 is None:
                    continue
                # one dequantized weight (or row piece of one) alive at a time
                build = functools.partial(_wide_weight, base, lora_b, scale, lo, width, dy2.dtype)
                dwide = input_grad_pieces(dy2, build, row_pieces(base), dwide)
            if dwide is None:
                return (None,) * (3 + 3 * n)
            dxa = dwide[:, k : k + rank].clone()  # s_i g_i per slot; a copy, since dx is accumulated beside it
        else:  # no input gradient: each slot's s_i dy_i B_i directly (rank-r GEMMs)
            zero = wide.new_zeros(())
            dxa = torch.cat([(dy2 @ b.to(wide.dtype)).mul_(s) if dy2 is not None else zero.expand(m, b.shape[1])
                             for dy2, b, s in zip(dy2s, lora_bs, ctx.scales, strict=True)], dim=1)  # fmt: skip
        das = [None] * n
        if any(need[3 + n : 3 + 2 * n]):
            das = list((dxa.t() @ wide[:, :k]).split(ranks))  # [R, K]: every member's A at once
            das = [None if dy is None else da for dy, da in zip(dys, das, strict=True)]  # unused: no gradient
        dbs = [
            None if dy2 is None or not need[3 + 2 * n + i] else (dy2.t() @ wide[:, lo : lo + r]).mul_(s)
            for i, (dy2, lo, r, s) in enumerate(zip(dy2s, los, ranks, ctx.scales, strict=True))
        ]
        dbiases = [None if dy2 is None or not need[3 + i] else dy2.sum(0) for i, dy2 in enumerate(dy2s)]
        dx = None
        if need_x:
            dx = dwide[:, :k].addmm_(dxa, torch.cat(lora_as))
            dx = dx.view(*next(dy for dy in dys if dy is not None).shape[:-1], k)
        return (dx, None, None, *dbiases, *das, *dbs)


class ProjectionGroup:
    """LoRALinear layers that read the same input, run as one :class:`GroupedLoRAFunction` node when they can."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._pending: tuple | None = None  # (key, {member: output}) kept for the members not yet called

    def _key(self, x: torch.Tensor) -> tuple:
        versions = tuple(p._version for m in self.members for p in (m.lora_A.weight, m.lora_B.weight))
        return x, x._version, versions, torch.is_grad_enabled()

    def _runnable(self, x: torch.Tensor) -> bool:
        if _get_current_dispatch_mode() is not None or x.shape[-1] % 8:
            return False
        return all(isinstance(m.base_layer, Linear4bit) and fusable(m, x) for m in self.members)

    def spare_cols(self) -> int:
        """Columns the shared input needs beside its own for this group's node to widen it in place."""
        k = self.members[0].in_features
        return group_width(k, [m.r for m in self.members]) - k

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output on ``x``, from the group's node; None when the group cannot run on ``x``."""
        if self._pending is not None:
            key, outs = self._pending
            if member in outs and key[0] is x and key[1:] == self._key(x)[1:]:
                y = outs.pop(member)
                if not outs:
                    self._pending = None
                return y
        self._pending = None
        if not self._runnable(x):
            return None
        ms = self.members
        bases = tuple(m.base_layer for m in ms)
        biases = [None if m.bias is None else m.bias.to(x.dtype) for m in ms]
        tensors = (*biases, *(m.lora_A.weight for m in ms), *(m.lora_B.weight for m in ms))
        ys = GroupedLoRAFunction.apply(x, bases, tuple(m.scale for m in ms), *tensors)
        outs = dict(zip(ms, ys, strict=True))
        y = outs.pop(member)
        self._pending = (self._key(x), outs) if outs else None
        return y


def group_lora(model: nn.Module, on: bool = True) -> int:
    """Group the fused LoRA projections of ``model`` that read one input (:data:`GROUPS`); how many groups."""
    from .layer import LoRALinear  # layer.py imports this module

    count = 0
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if not all(isinstance(m, LoRALinear) for m in members):
                continue
            grouped = on and all(m.fused and isinstance(m.base_layer, Linear4bit) for m in members)
            grouped = grouped and len({m.base_layer.in_features for m in members}) == 1
            group = ProjectionGroup(members) if grouped else None
            for m in members:
                m.group = group
            count += grouped
    return count
