"""Measured peak GPU memory (and speed) of a kbit QLoRA training step against `kbit estimate`.

    python3 bench/train_memory.py --batches 1 4 8 [--seq-len 2048] [--steps 3]

Llama-3-8B shape with random weights (quantized to NF4 + double quant on the GPU, nothing downloaded), LoRA r=16
alpha 32 dropout 0 on all seven projections (bf16 adapters), non-reentrant gradient checkpointing on every decoder
layer, bf16 compute, the loss computed from float32 logits, torch fused AdamW over the adapters. For each batch it
runs ``--steps`` steps, reports the median step time as tokens/s and ``torch.cuda.max_memory_allocated`` over the
steps after the first, and prints the estimate's parts next to it. This is kbit's reference (unfused) path: the
fused kernels and the memory plan of the GPU fast path are not in it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def random_quantized_llama(preset: str, device: str = "cuda"):
    """A Llama of a preset shape with random NF4 + DQ linears, built layer by layer on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbit.estimate import PRESETS
    from kbit.nn import Linear4bit
    from kbit.quant import quantize_4bit

    kw = dict(PRESETS[preset])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and mod is not head:
            w = torch.randn(mod.out_features, mod.in_features, device=device, dtype=torch.bfloat16) * 0.02
            packed, state = quantize_4bit(w, "nf4", 64, True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_quantized(packed, state))
    materialize_rest(model, config, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def materialize_rest(model: nn.Module, config, device: str = "cuda") -> None:
    """Give what is still on meta (embeddings, norms, the head) real random values, and rebuild the rotary tables."""
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                t = (
                    torch.ones(p.shape, device=device, dtype=p.dtype)
                    if p.dim() == 1
                    else (torch.randn(p.shape, device=device, dtype=p.dtype) * 0.02)
                )
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.device(device):  # the rotary tables were computed on meta: build them again for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)


def step_stats(model, batch: int, seq_len: int, steps: int, vocab: int) -> tuple[float, float]:
    """(median tokens/s, peak allocated GiB after the first step) of ``steps`` training steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times = []
    for i in range(steps):
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (batch, seq_len), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch * seq_len / statistics.median(times[1:]), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    """Run each batch size and print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from kbit.estimate import estimate, model_shape
    from kbit.lora import add_lora

    t = time.perf_counter()
    model, config = random_quantized_llama(args.preset)
    add_lora(model, r=16, alpha=32, dropout=0.0, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    print(f"built {args.preset} in {time.perf_counter() - t:.0f} s on {torch.cuda.get_device_name()}", flush=True)
    shape = model_shape(config)
    rows = []
    for b in args.batches:
        tok_s, peak = step_stats(model, b, args.seq_len, args.steps, config.vocab_size)
        est = estimate(shape, args.seq_len, b).total / 2**30
        rows.append((b, tok_s, peak, est))
        print(f"batch {b}: {tok_s:,.0f} tokens/s, peak {peak:.2f} GiB, estimate {est:.2f} GiB", flush=True)
        torch.cuda.empty_cache()
    print(f"\n| batch x {args.seq_len} | tokens/s | measured peak GiB | estimate GiB | error |")
    print("|---|---|---|---|---|")
    for b, tok_s, peak, est in rows:
        print(f"| {b} | {tok_s:,.0f} | {peak:.2f} | {est:.2f} | {100 * (est / peak - 1):+.0f}% |")


if __name__ == "__main__":
    main()
