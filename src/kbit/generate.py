"""Text generation from a (quantized, adapted) model with the tokenizer's chat template and a KV cache.

This is the plain path on transformers' ``generate``; the fast decode path (static cache, CUDA graphs, fused 4-bit
GEMV) comes with its own issue and must give the same greedy tokens as this one.
"""

from __future__ import annotations

import torch

Messages = list[dict[str, str]]


def render_prompt(tokenizer, prompt: str | Messages, chat: bool = True) -> torch.Tensor:
    """Token ids [1, T] of ``prompt``: a string becomes one user turn; the chat template adds the assistant header."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=False)
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
) -> str:
    """The model's reply to ``prompt`` (greedy when temperature is 0), cut at the end-of-turn token or a stop string."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    device = next(model.parameters()).device
    ids = render_prompt(tokenizer, prompt).to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {limit}; shorten the prompt or lower max_new_tokens")
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None) if sample else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
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
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for s in stop or []:
        text = text.split(s)[0]
    return text.strip()


def _end_tokens(tokenizer) -> list[int]:
    """Token ids that end a reply: eos plus the chat template's end-of-turn marker when it has one."""
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ends.add(tid)
    return sorted(ends)
