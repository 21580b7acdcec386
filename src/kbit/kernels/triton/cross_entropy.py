"""Triton softmax-minus-onehot for one chunk of logits, matching :func:`kbit.kernels.loss.ce_chunk_ref`.

A program owns one row of the [C, V] chunk. Pass 1 streams the row in BLOCK-wide slices keeping a running
max and rescaled sum of exponentials (online logsumexp, float32), then reads the target's logit; pass 2
streams the row again and overwrites it with (softmax - onehot) · scale in the logits' own dtype. The row is
read twice and written once, and no float32 copy of the chunk is ever made (PyTorch's log_softmax, its
backward and the float32 cast would write three).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
WARPS = 8


@triton.jit
def _softcapped(z, cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # tanh(u) = 2σ(2u) - 1: tl has sigmoid on every backend, the interpreter included
        return cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)
    else:
        return z


@triton.jit
def _ce_chunk_kernel(
    logits_ptr,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    V,
    stride,
    cap,
    ignore_index,
    BLOCK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)

    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max and sum: one reduction at the end
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        c = start + cols
        z = _softcapped(tl.load(base + c, mask=c < V, other=0.0).to(tl.float32), cap, SOFTCAP)
        z = tl.where(c < V, z, float("-inf"))  # after the cap: it maps -inf to -cap
        m_new = tl.maximum(m, z)
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes masked so far add exp(-inf) = 0, never NaN
        s = s * tl.exp(m - ms) + tl.exp(z - ms)
        m = m_new
    mx = tl.max(m, 0)  # finite: V >= 1
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
    safe = tl.where(valid, target, 0)
    zt = _softcapped(tl.load(base + safe).to(tl.float32), cap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - zt, 0.0))

    if GRAD:
        sc = tl.where(valid, tl.load(scale_ptr + row), 0.0)
        for start in range(0, V, BLOCK):
            c = start + cols
            raw = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            z = _softcapped(raw, cap, SOFTCAP)
            g = (tl.exp(z - lse) - tl.where(c == safe, 1.0, 0.0)) * sc
            if SOFTCAP:
                th = z / cap
                g = g * (1.0 - th * th)
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=c < V)


def ce_chunk(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None, softcap: float | None, ignore_index: int
) -> torch.Tensor:
    """Per-row loss (float32) of a [C, V] chunk; with ``scale`` [C], logits become their gradient × scale."""
    if logits.stride(-1) != 1:
        raise ValueError("ce_chunk: the logits chunk must have a unit last stride")
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    grad = scale is not None
    _ce_chunk_kernel[(C,)](
        logits,
        targets.contiguous(),
        scale.contiguous().float() if grad else loss,
        loss,
        V,
        logits.stride(0),
        float(softcap or 1.0),
        ignore_index,
        BLOCK=min(BLOCK, triton.next_power_of_2(V)),
        SOFTCAP=softcap is not None,
        GRAD=grad,
        num_warps=WARPS,
    )
    return loss
