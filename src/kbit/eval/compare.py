"""Perplexity of a model on a token sequence, and how far a second model's predictions drift from the first's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LogitComparison:
    """Per-token mean KL(reference || candidate) and both perplexities on the same tokens."""

    tokens: int
    kl: float
    ppl_reference: float
    ppl_candidate: float

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change of the candidate over the reference."""
        return self.ppl_candidate / self.ppl_reference - 1.0


def _chunks(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    return [ids[i : i + length] for i in range(0, ids.numel() - 1, length) if ids[i : i + length].numel() > 1]


@torch.no_grad()
def _log_probs(model, chunk: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(chunk[None].to(device)).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int = 512) -> float:
    """exp(mean next-token NLL) of ``model`` over ``ids`` [T], in independent windows of ``length`` tokens."""
    nll, n = 0.0, 0
    for chunk in _chunks(ids, length):
        lp = _log_probs(model, chunk)
        nll -= lp.gather(1, chunk[1:, None]).sum().item()
        n += chunk.numel() - 1
    return math.exp(nll / n)


@torch.no_grad()
def compare_models(reference, candidate, ids: torch.Tensor, length: int = 512) -> LogitComparison:
    """KL divergence of ``candidate``'s next-token distribution from ``reference``'s, and both perplexities."""
    kl, nll_r, nll_c, n = 0.0, 0.0, 0.0, 0
    for chunk in _chunks(ids, length):
        lr, lc = _log_probs(reference, chunk), _log_probs(candidate, chunk)
        kl += (lr.exp() * (lr - lc)).sum().item()
        target = chunk[1:, None]
        nll_r -= lr.gather(1, target).sum().item()
        nll_c -= lc.gather(1, target).sum().item()
        n += chunk.numel() - 1
    # KL >= 0; equal distributions give a sum of roundoff that can land a hair below zero.
    return LogitComparison(n, max(kl / n, 0.0), math.exp(nll_r / n), math.exp(nll_c / n))
