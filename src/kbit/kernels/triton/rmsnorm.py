"""Triton RMSNorm, forward and backward, matching :func:`kbit.kernels.norm.rms_norm_forward_ref` / ``_backward_ref``.

A program owns a tile of ROWS whole rows ([ROWS, BLOCK], BLOCK the next power of two of D), so the row
statistics are one in-register reduction and x is read once in the forward and once in the backward. Small D
(Qwen3's per-head q/k norms, D = 128) packs many rows per program so a launch is not thousands of tiny programs.
The backward runs a fixed number of programs that stride over the row tiles, each accumulating its share of
dweight in float32 registers and writing one partial row; the partials are summed by one torch reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_ELEMS = 4096  # elements per tile: rows per program = max(1, ROW_ELEMS // BLOCK)
WARPS = 8  # a 4096-element float32 tile is 16 values per thread


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    rows,
    D,
    y_ld,  # y's row stride: D, or wider when y is the first columns of a buffer (rms_norm's spare_cols)
    eps,
    offset,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ROUND: tl.constexpr,  # round n to x's dtype before the weight multiply (Llama's order)
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * ROWS + tl.arange(0, ROWS)  # [ROWS]
    c = tl.arange(0, BLOCK)
    live = (r[:, None] < rows) & (c[None, :] < D)
    offs = r[:, None] * D + c[None, :]  # [ROWS, BLOCK]
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [ROWS]
    n = x * rstd[:, None]
    if ROUND:
        n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + r[:, None] * y_ld + c[None, :], (n * w[None, :]).to(y_ptr.dtype.element_ty), mask=live)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,  # [programs, D] float32 partial sums of dweight (only when NEED_DW)
    rows,
    D,
    dy_ld,  # dy's row stride: a grouped LoRA node hands back the first D columns of a wider buffer
    offset,
    tiles,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ROUND: tl.constexpr,
    NEED_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(pid, tiles, tl.num_programs(0)):
        r = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        live = (r[:, None] < rows) & (c[None, :] < D)
        offs = r[:, None] * D + c[None, :]
        x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + r[:, None] * dy_ld + c[None, :], mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
        n = x * rstd[:, None]
        gw = g * w[None, :]
        mean_gwn = tl.sum(gw * n, axis=1) / D  # [ROWS]
        dx = rstd[:, None] * (gw - n * mean_gwn[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=live)
        if NEED_DW:
            if ROUND:
                n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(g * n, axis=0)
    if NEED_DW:
        tl.store(dw_part_ptr + pid * D + c, dw_acc, mask=c < D)


def _tiling(D: int) -> tuple[int, int]:
    block = triton.next_power_of_2(D)
    return block, max(1, ROW_ELEMS // block)


def _programs(device: torch.device, tiles: int) -> int:
    # Enough programs to fill the GPU a few times over; the interpreter (CPU) needs only a handful.
    per = torch.cuda.get_device_properties(device).multi_processor_count * 4 if device.type == "cuda" else 4
    return max(1, min(tiles, per))


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    round_normed: bool,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [rows, D] in ``out_dtype``, rstd [rows] float32) for a 2-D ``x``; y written into ``out`` if given (its
    rows may be strided)."""
    x = x.contiguous()
    rows, D = x.shape
    y = torch.empty((rows, D), dtype=out_dtype, device=x.device) if out is None else out
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block, per = _tiling(D)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, per),)](
        x,
        weight.contiguous(),
        y,
        rstd,
        rows,
        D,
        y.stride(0),
        eps,
        offset,
        BLOCK=block,
        ROWS=per,
        ROUND=round_normed,
        num_warps=WARPS,
    )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    round_normed: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx like x, dweight like weight or None); ``dy``'s rows may be strided."""
    x = x.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    rows, D = x.shape
    dx = torch.empty_like(x)
    block, per = _tiling(D)
    tiles = triton.cdiv(rows, per)
    progs = _programs(x.device, tiles)
    part = torch.empty((progs, D) if need_dweight else (1,), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(progs,)](
        dy,
        x,
        weight.contiguous(),
        rstd,
        dx,
        part,
        rows,
        D,
        dy.stride(0),
        offset,
        tiles,
        BLOCK=block,
        ROWS=per,
        ROUND=round_normed,
        NEED_DW=need_dweight,
        num_warps=WARPS,
    )
    return dx, part.sum(0).to(weight.dtype) if need_dweight else None
