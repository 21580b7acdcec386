"""Cross-entropy fused with the LM head, in chunks of tokens, so the [N, vocab] logits never exist at once.

For hidden h [N, H], head W [V, H] and targets t [N] (``ignore_index`` marks rows without a target):
    z = h Wᵀ  (optionally z ← cap · tanh(z / cap), Gemma2's final soft-cap),  loss_i = logsumexp(z_i) - z_i[t_i]
    loss = Σ_i loss_i  ("sum")  or  Σ_i loss_i / #targets  ("mean")
Each chunk of rows makes its logits (in the matmul dtype, bf16 under autocast, as transformers' head does),
takes the float32 logsumexp and loss, and overwrites the logits with their gradient
    dz_i = (softmax(z_i) - onehot(t_i)) · scale_i      (scale_i = 1 or 1/#targets; 0 for ignored rows)
then turns it into dh = dz W right away (and dW += dzᵀ h when the head trains). The loss is a scalar, so its
gradient is ready after the forward: the backward only multiplies by the incoming scalar, and no chunk's
logits are made twice. Peak extra memory is one chunk's logits, not N × V (the default chunk holds 256 MiB).

The per-chunk softmax-minus-onehot is the kernel: PyTorch here (the reference, also used on CPU), Triton on
CUDA (:mod:`kbit.kernels.triton.cross_entropy`), which streams each row twice instead of making float32 copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from .norm import _acc

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # logits of one chunk


def ce_chunk_ref(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None, softcap: float | None, ignore_index: int
) -> torch.Tensor:
    """Per-row loss (float32; float64 for float64 logits; 0 for ignored rows) of a [C, V] chunk: the PyTorch
    reference. With ``scale`` [C], the logits are overwritten in place by their gradient times ``scale``."""
    z = _acc(logits)
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = th * softcap
    lse = torch.logsumexp(z, -1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss = torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], 0.0)
    if scale is not None:
        grad = torch.exp(z - lse[:, None])
        grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
        grad *= torch.where(valid, scale, 0.0)[:, None]
        if softcap is not None:
            grad *= 1 - th * th
        logits.copy_(grad)
    return loss


def _chunk_kernel(x: torch.Tensor):
    if use_triton(x):
        from .triton import cross_entropy

        return cross_entropy.ce_chunk
    return ce_chunk_ref


def _chunk_rows(n: int, vocab: int, itemsize: int) -> int:
    rows = max(1, CHUNK_BYTES // (vocab * itemsize))
    return min(n, 1 << (rows.bit_length() - 1))  # a power of two: matmul-friendly shapes


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed (or mean) token cross-entropy of ``hidden @ weight.T``, gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, mean, softcap, chunk_rows, grad_enabled):
        # Grad mode is always off inside forward and needs_input_grad ignores it: the caller passes it.
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = grad_enabled and (need_dh or need_dw)
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = valid.sum()
        # Gradient scale per row: 1 (sum) or 1/#targets (mean), on the device (no host sync).
        acc = torch.promote_types(hidden.dtype, torch.float32)
        scale = valid.to(acc) / count.clamp(min=1) if mean else valid.to(acc)
        dh = torch.empty_like(hidden) if need_grad and need_dh else None
        dw_dtype = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if need_grad and need_dw else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        kernel = None
        for lo in range(0, n, chunk_rows):
            h = hidden[lo : lo + chunk_rows]
            logits = F.linear(h, weight)  # [C, V], autocast's dtype when it is on, as transformers' head
            kernel = kernel or _chunk_kernel(logits)
            loss = kernel(logits, targets[lo : lo + chunk_rows], scale[lo : lo + chunk_rows] if need_grad else None,
                          softcap, ignore_index)  # fmt: skip
            total += loss.sum()
            if dh is not None:
                dh[lo : lo + chunk_rows] = logits @ weight.to(logits.dtype)  # [C, V] @ [V, H]
            if dw is not None:
                dw += logits.t() @ h.to(logits.dtype)  # [V, C] @ [C, H], summed in float32
            del logits, loss  # freed before the next chunk's logits exist: one chunk at a time, not two
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return total / count if mean else total

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else dw * grad_loss.to(dw.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    skip_ignored: bool = True,
    max_chunk_rows: int | None = None,
) -> torch.Tensor:
    """Token cross-entropy of the logits ``hidden @ weight.T`` against ``targets`` without materialising them.

    hidden [..., H], targets [...] (same leading shape), weight [V, H]; ``reduction`` "mean" (over the target
    tokens) or "sum" (for token-normalised accumulation across micro-batches). ``skip_ignored`` first drops
    the rows whose target is ``ignore_index`` (one host sync; the prompt tokens of chat data cost nothing then).
    ``chunk_rows`` sets the rows per chunk; by default a chunk holds 256 MiB of logits, or ``max_chunk_rows`` rows
    if that is fewer (a memory plan's cap).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
            f"{tuple(targets.shape)} do not fit (hidden [..., H], weight [V, H], targets [...])"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    # The compaction needs the count on the host: skipped inside a CUDA-graph capture (ignored rows then cost their
    # matmul but still add nothing).
    if skip_ignored and not (h.is_cuda and torch.cuda.is_current_stream_capturing()):
        keep = (t != ignore_index).nonzero().squeeze(1)
        if len(keep) < len(t):
            h, t = h[keep], t[keep]
    if chunk_rows is None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        chunk_rows = _chunk_rows(max(1, h.shape[0]), weight.shape[0], dtype.itemsize)
        if max_chunk_rows is not None:
            chunk_rows = max(1, min(chunk_rows, max_chunk_rows))
    return LinearCrossEntropyFunction.apply(
        h, weight, t, ignore_index, reduction == "mean", softcap, chunk_rows, torch.is_grad_enabled()
    )
