"""Text generation from a (quantized, adapted) model with the tokenizer's chat template and a KV cache.

Two engines give the same greedy tokens: kbit's static decoder (:mod:`kbit.decode`: static KV cache, CUDA graphs and
the fused 4-bit GEMV on a GPU; Llama, Mistral, Qwen2, Qwen3) and transformers' ``generate`` (every other family, and
the reference the tests hold the static decoder to).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .lora.adapters import adapter_active, check_adapter

Messages = list[dict[str, str]]
log = logging.getLogger("kbit")


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


ENGINES = ("auto", "static", "transformers")


@torch.no_grad()
def generate(model, tokenizer, prompt: str | Messages, max_new_tokens: int = 128, **options) -> str:
    """The model's reply to ``prompt`` (greedy by default), cut at the end-of-turn token or a stop string.

    ``options`` are :func:`generate_batch_ids`'s: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``stop``,
    ``seed``, ``dense``, ``engine`` ("auto", "static", "transformers"), ``truncate`` and ``adapter`` (a loaded
    adapter's name, or "base" for none; default: the active one).
    """
    (text,) = generate_batch(model, tokenizer, [prompt], max_new_tokens, **options)
    return text


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str | Messages, max_new_tokens: int = 128, **options) -> list[int]:
    """The token ids :func:`generate` decodes (the end-of-turn token included when reached)."""
    (ids,) = generate_batch_ids(model, tokenizer, [prompt], max_new_tokens, **options)
    return ids


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str | Messages],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    **options,
) -> list[str]:
    """Replies to many prompts, decoded ``batch_size`` at a time; each equals that prompt's reply alone."""
    stop = options.get("stop") or []
    texts = []
    for ids in generate_batch_ids(model, tokenizer, prompts, max_new_tokens, batch_size, **options):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        texts.append(text.strip())
    return texts


@torch.no_grad()
def generate_batch_ids(
    model,
    tokenizer,
    prompts: list[str | Messages],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dense: bool | None = None,
    engine: str = "auto",
    truncate: bool = False,
    adapter: str | None = None,
) -> list[list[int]]:
    """New token ids per prompt, decoded ``batch_size`` prompts at a time.

    ``engine``: "static" (kbit's static-cache decoder: CUDA graphs and the fused 4-bit GEMV on a GPU), "transformers"
    (transformers' ``generate``), "auto" (static for the families it supports, else transformers, with a log line).
    ``dense`` (default: on the CPU) dequantizes each quantized layer once for the whole reply instead of once per
    token; the values are the same, so the tokens are too. ``truncate`` keeps the end of a prompt that is too long
    for the context instead of raising. ``seed`` makes sampling (temperature > 0) repeatable. ``adapter`` names the
    loaded adapter to answer with ("base": none; default: the active one); the one active before comes back after.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to answer")
    check_adapter(model, adapter)
    device = next(model.parameters()).device
    encoded = [_fit_context(model, render_prompt(tokenizer, p)[0], max_new_tokens, truncate) for p in prompts]
    static = _use_static(model, engine, max(ids.numel() for ids in encoded) + max_new_tokens)
    was_training = model.training
    model.eval()
    dense = device.type == "cpu" if dense is None else dense
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    ends = _end_tokens(tokenizer)
    results: list[list[int]] = []
    try:
        chosen = contextlib.nullcontext() if adapter is None else adapter_active(model, adapter)
        with chosen, dequantized(model) if dense else contextlib.nullcontext():
            for lo in range(0, len(encoded), batch_size):
                chunk = [ids.to(device) for ids in encoded[lo : lo + batch_size]]
                if static:
                    from .decode import decode

                    gen = None if seed is None else torch.Generator(device).manual_seed(seed)
                    results += decode(model, chunk, max_new_tokens, ends, generator=gen, **sampling)
                else:
                    if seed is not None:
                        torch.manual_seed(seed)
                    results += [
                        _hf_generate(model, tokenizer, ids, max_new_tokens, ends, stop, **sampling) for ids in chunk
                    ]
    finally:
        model.train(was_training)
    return results


def _fit_context(model, ids: torch.Tensor, max_new_tokens: int, truncate: bool) -> torch.Tensor:
    """The prompt ids, checked (or, with ``truncate``, cut from the left) against the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.numel() + max_new_tokens > limit:
        if truncate and max_new_tokens < limit:
            return ids[ids.numel() - (limit - max_new_tokens) :]
        raise ValueError(
            f"prompt of {ids.numel()} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {limit}; shorten the prompt, lower max_new_tokens or pass truncate=True (--truncate)"
        )
    return ids


def _use_static(model, engine: str, length: int) -> bool:
    """Whether to decode with kbit's static decoder; says once per model why not when ``auto`` falls back."""
    from .decode import unsupported_reason

    reason = unsupported_reason(model, length)
    if reason is None:
        return engine != "transformers"
    if engine == "static":
        raise ValueError(f"engine='static' cannot run this model: {reason}; use engine='auto' or 'transformers'")
    if engine == "auto" and not getattr(model, "_kbit_fallback_logged", False):
        log.info("kbit generate: %s; decoding with transformers' generate instead of the static decoder", reason)
        model._kbit_fallback_logged = True
    return False


def _hf_generate(model, tokenizer, ids, max_new_tokens, ends, stop, temperature, top_p, top_k) -> list[int]:
    """One prompt through transformers' ``generate`` (the reference path)."""
    sample = temperature > 0
    kw = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
        if sample
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    ids = ids.view(1, -1)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=ends,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stop_strings=stop,
        tokenizer=tokenizer if stop else None,
        **kw,
    )
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
