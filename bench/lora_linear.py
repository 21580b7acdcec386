"""Fused vs unfused LoRA linear: forward + backward time of each Llama-3-8B projection on one GPU.

    python3 bench/lora_linear.py [--tokens 16384] [--rank 16] [--iters 20]

Each of the seven projections of a Llama-3-8B decoder layer (NF4 + double quant base, bf16 compute, LoRA alpha 32,
bf16 adapters, no dropout) runs forward and backward under bf16 autocast, as the trainer runs it, with gradients
for x, A and B, at --tokens tokens: unfused (kbit's LoRALinear: base, A, B, scale and sum as separate ops) and
fused (:mod:`kbit.lora.fused`). Times are the median of --iters CUDA-event timings of one forward + backward after
three warm-up passes. The last row sums the seven projections and multiplies by 32 layers: the projections' share
of one step's forward + backward at that many tokens, without recomputation.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kbit.lora import LoRALinear
from kbit.nn import Linear4bit

SHAPES = [
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 1024),
    ("v_proj", 4096, 1024),
    ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 14336),
    ("up_proj", 4096, 14336),
    ("down_proj", 14336, 4096),
]
LAYERS = 32


def forward_backward_ms(layer: LoRALinear, x: torch.Tensor, dy: torch.Tensor, iters: int) -> float:
    """Median milliseconds of one forward + backward (gradients for x, A and B) under bf16 autocast."""
    inputs = [x, layer.lora_A.weight, layer.lora_B.weight]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        torch.autograd.grad(y, inputs, dy)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    """Print one row per projection and the 32-layer total."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora_linear.py needs a CUDA GPU: run it on the device machine")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, r={args.rank}")
    print("| projection | in x out | unfused ms | fused ms | unfused/fused | max |y diff| / max |y| |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, in_f, out_f in SHAPES:
        torch.manual_seed(0)
        base = Linear4bit(in_f, out_f, bias=False, device="cuda")  # NF4 + DQ, bf16 compute
        layer = LoRALinear(base, r=args.rank, alpha=32, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.02)  # nonzero, so the adapter's products are real work
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16)
        ms, outputs = [], []
        for fused in (False, True):
            layer.fused = fused
            ms.append(forward_backward_ms(layer, x, dy, args.iters))
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                outputs.append(layer(x).float())
        diff = ((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()).item()
        totals = [t + m for t, m in zip(totals, ms, strict=True)]
        print(f"| {name} | {in_f}x{out_f} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.3f}x | {diff:.1e} |")
        del layer, base, x, dy, outputs
        torch.cuda.empty_cache()
    unfused, fused = (t * LAYERS for t in totals)
    print(f"| all 7 x {LAYERS} layers | | {unfused:.1f} | {fused:.1f} | {unfused / fused:.3f}x | |")


if __name__ == "__main__":
    main()
