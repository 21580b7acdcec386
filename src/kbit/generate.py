"""Text generation from a (quantized, adapted) model with the tokenizer's chat template and a KV cache.

This is the plain path on transformers' ``generate``; the fast decode path (static cache, CUDA graphs, fused 4-bit
GEMV) comes with its own issue and must give the same greedy tokens as this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

Messages = list[dict[str, str]]


def render_prompt(tokenizer, prompt: str | Messages, chat: bool = True) -> torch.Tensor:
    """Token ids [1, T] of ``prompt``: a string becomes one user turn; the chat template adds the assistant header."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    if not isinstance(prompt, str):
        raise ValueError("this tokenizer has no chat template: pass the prompt as a string")
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str | Messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dense: bool | None = None,
) -> str:
    """The model's reply to ``prompt`` (greedy when temperature is 0), cut at the end-of-turn token or a stop string.

    ``dense`` (default: on the CPU) dequantizes each quantized layer once for the whole reply instead of once per
    token; the values are the same, so the tokens are too.
    """
    new = generate_ids(model, tokenizer, prompt, max_new_tokens, temperature, top_p, top_k, stop, seed, dense)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop or []:
        text = text.split(s)[0]
    return text.strip()


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt: str | Messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dense: bool | None = None,
) -> list[int]:
    """The token ids :func:`generate` decodes (the end-of-turn token included when reached)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    device = next(model.parameters()).device
    ids = render_prompt(tokenizer, prompt).to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {limit}; shorten the prompt or lower max_new_tokens"
        )
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    kw = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
        if sample
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    was_training = model.training
    model.eval()
    dense = device.type == "cpu" if dense is None else dense
    try:
        with dequantized(model) if dense else contextlib.nullcontext():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=_end_tokens(tokenizer),
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                stop_strings=stop,
                tokenizer=tokenizer if stop else None,
                **kw,
            )
    finally:
        model.train(was_training)
    return out[0, ids.shape[1] :].tolist()


def _end_tokens(tokenizer) -> list[int]:
    """Token ids that end a reply: eos plus the chat template's end-of-turn marker when it has one."""
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ends.add(tid)
    return sorted(ends)


@contextlib.contextmanager
def dequantized(model: nn.Module) -> Iterator[None]:
    """Within the block, every quantized linear is replaced by an ``nn.Linear`` holding its dequantized weight."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if (
            callable(getattr(mod, "dequantize", None))
            and hasattr(mod, "compute_dtype")
            and not isinstance(mod, nn.Linear)
        ):
            dense = _DenseLinear(mod)
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, dense)
            swapped.append((owner, child, mod))
    try:
        yield
    finally:
        for owner, child, mod in swapped:
            setattr(owner, child, mod)


class _DenseLinear(nn.Module):
    """A quantized linear's forward with its weight dequantized once: same inputs/outputs dtypes and values."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.compute_dtype = quantized.compute_dtype
        self.weight = quantized.dequantize(self.compute_dtype)
        self.bias = None if quantized.bias is None else quantized.bias.detach().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.to(dtype or self.compute_dtype)
