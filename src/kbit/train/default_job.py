"""The embedded default job (``kbit train`` with no config) and the task evaluation it reports.

SmolLM2-135M-Instruct in NF4 with double quantization, LoRA r=16 on every linear layer, trained on the
built-in date-to-ISO task (:mod:`kbit.data.builtin`), whose answers are checked exactly. Before and after
training it measures the eval loss and the exact-match accuracy of greedy answers on held-out prompts, and
shows one sample answer. ``DEFAULT_JOB`` holds the keys it sets on top of TrainConfig's defaults (sized for a
few minutes on a 2-core CPU); ``QUICK`` (``kbit train --quick``) is the CI-sized version of it.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_JOB: dict[str, Any] = {
    "max_train_samples": 320,  # 40 steps of 8: one epoch
    "max_eval_samples": 64,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,  # LoRA on a 135M model tolerates a high rate; a short run needs it
    "warmup_ratio": 0.1,
    "max_seq_len": 128,  # every builtin example is under 64 tokens
    "logging_steps": 5,
    "eval_steps": 20,
    "save_steps": 20,
    "eval_accuracy_samples": 50,
    "generation_max_new_tokens": 12,  # 'YYYY-MM-DD' is 10 tokens, plus the end-of-turn token
}

QUICK: dict[str, Any] = {
    "max_train_samples": 120,  # 15 steps of 8
    "max_eval_samples": 24,
    "eval_steps": 0,
    "save_steps": 0,
    "eval_accuracy_samples": 16,
}


def answer_prompts(
    model: torch.nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy answers to each record's conversation minus its last (assistant) turn, batched, left-padded.

    One batch of many prompts beats many batches: on a CPU each decoding step dequantizes every 4-bit layer
    once, whatever the batch size.
    """
    device = next(model.parameters()).device
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in records
    ]
    # A tokenizer without a padding token (Llama 3's; SmolLM2's GGUF under some transformers versions) refuses to
    # pad: left padding with the end-of-text token is masked out anyway. Both are put back afterwards.
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # answers must start right after each prompt
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                )
                answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        if pad_token is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return [a.strip() for a in answers]


def task_accuracy(model: torch.nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int) -> dict:
    """Exact-match accuracy (``kbit.data.check_answer``) of greedy answers, and the first prompt's answer."""
    from ..data import check_answer

    answers = answer_prompts(model, tokenizer, records, max_new_tokens)
    correct = sum(check_answer(r, a) for r, a in zip(records, answers, strict=True))
    first = records[0]["messages"]
    return {
        "accuracy": correct / len(records),
        "correct": correct,
        "n": len(records),
        "sample": {"prompt": first[-2]["content"], "expected": first[-1]["content"], "answer": answers[0]},
    }
