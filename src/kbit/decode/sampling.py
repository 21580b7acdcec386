"""Next-token choice from logits: greedy, temperature, top-k, top-p, without a host synchronisation.

Sampling uses the Gumbel-max trick (argmax of logits / T plus Gumbel noise is a draw from softmax(logits / T)), so it
needs no ``torch.multinomial`` and every step stays on the device.
"""

from __future__ import annotations

import torch


def pick(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when ``temperature`` is 0, else a filtered softmax draw."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(min=1e-20)
    return (logits - torch.log(-torch.log(u))).argmax(-1)
