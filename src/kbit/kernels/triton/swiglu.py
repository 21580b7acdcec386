"""Triton SwiGLU forward and backward, matching :mod:`kbit.kernels.activation`'s reference value for value.

Pure elementwise memory traffic: a program handles BLOCK columns of one row, so inputs may be strided views
(rows apart by any stride, columns contiguous), which lets Phi3's ``gate_up.chunk(2, -1)`` halves in without a
copy. Outputs are contiguous. The forward reads 2 and writes 1 value per element, the backward reads 3 and
writes 2, against 4 reads / 3 writes for silu, multiply and their separate backward kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, width, g_stride, u_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < width
    g = tl.load(g_ptr + row * g_stride + c, mask=live, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + c, mask=live, other=0.0).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounded, as F.silu returns it
    tl.store(out_ptr + row * width + c, (a * u).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _swiglu_bwd_kernel(d_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, width, d_stride, g_stride, u_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < width
    d = tl.load(d_ptr + row * d_stride + c, mask=live, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + c, mask=live, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + c, mask=live, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    a = (g * sig).to(dg_ptr.dtype.element_ty).to(tl.float32)
    da = (d * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
    dg = da * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * width + c, dg.to(dg_ptr.dtype.element_ty), mask=live)
    tl.store(du_ptr + row * width + c, (d * a).to(du_ptr.dtype.element_ty), mask=live)


def _grid(rows: int, width: int) -> tuple[int, int]:
    return rows, triton.cdiv(width, BLOCK)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for 2-D inputs with unit column stride; the output is contiguous."""
    rows, width = gate.shape
    out = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    _swiglu_fwd_kernel[_grid(rows, width)](
        gate, up, out, width, gate.stride(0), up.stride(0), BLOCK=BLOCK, num_warps=WARPS
    )
    return out


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up), contiguous, for 2-D inputs with unit column stride."""
    rows, width = gate.shape
    d_gate = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((rows, width), dtype=up.dtype, device=up.device)
    _swiglu_bwd_kernel[_grid(rows, width)](
        dout,
        gate,
        up,
        d_gate,
        d_up,
        width,
        dout.stride(0),
        gate.stride(0),
        up.stride(0),
        BLOCK=BLOCK,
        num_warps=WARPS,
    )
    return d_gate, d_up
