"""Triton kernel: rows of a table in page-locked host memory gathered straight into device memory.

An input embedding table kept in host memory (:class:`kbit.models.offload.HostEmbedding`) would otherwise be looked
up on the CPU: the token ids copied to the host (a synchronisation), the rows gathered there, copied into pinned
memory and sent over. Registered host memory is addressable from the GPU (unified addressing), so one kernel reads
each looked-up row over the bus and writes it to the output: no synchronisation, one launch, and a CUDA graph can
capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATHER_BLOCK = 1024  # elements of a row per program


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, H, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < H
    row = tl.load(ids_ptr + r).to(tl.int64)
    tl.store(out_ptr + r * H + cols, tl.load(table_ptr + row * H + cols, mask=live), mask=live)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` on ``ids``' CUDA device, ``table`` [V, H] in page-locked host memory (or on that device);
    ``ids`` must lie in [0, V) (not checked here: the caller checks where it can afford a synchronisation)."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"gather_rows: table must be a contiguous [V, H] tensor, got {tuple(table.shape)}")
    if table.device.type == "cpu" and not table.is_pinned():
        raise ValueError("gather_rows: a host table must be page-locked (pinned or cudaHostRegister-ed)")
    flat = ids.reshape(-1)
    h = table.shape[1]
    out = torch.empty((flat.numel(), h), dtype=table.dtype, device=ids.device)
    if flat.numel():
        grid = (flat.numel(), triton.cdiv(h, GATHER_BLOCK))
        _gather_rows_kernel[grid](table, flat, out, h, BLOCK=GATHER_BLOCK, num_warps=4)
    return out.view(*ids.shape, h)
