"""Decode speed of kbit's static decoder against transformers + bitsandbytes (and Unsloth when installed), one run.

    python3 bench/generate.py [--batches 1 4 16] [--new-tokens 128] [--peer-tokens 32] [--skip-peers]

On one CUDA GPU, in this order:
1. the device-to-device copy bandwidth (bytes read + written), the yardstick of the GEMV rows;
2. the fused 4-bit GEMV alone (NF4 + double quant, blocksize 64) on 14336x4096, 4096x4096 and 4096x14336 at 1, 4 and
   16 rows, against bitsandbytes' ``matmul_4bit`` on the same shapes (its batch-1 GEMV kernel): microseconds and
   the fraction of copy bandwidth (bytes counted: packed weight + 8-bit scales + nested scales + x + y). Weights
   rotate over enough copies to spill the 50 MB L2;
3. the Llama-3-8B shape (random weights, NF4 + double quant, bf16 head), prompt of 32 tokens, ``--new-tokens``
   greedy tokens, batch 1/4/16: kbit without adapters and with LoRA r=16 on all seven projections (unmerged),
   time to first token (prefill + first pick) and decode tokens/s per sequence;
4. peers on the same shape: transformers ``generate`` over bitsandbytes ``Linear4bit`` (NF4 + DQ), without and with
   PEFT LoRA r=16 adapters, ``--peer-tokens`` new tokens (their rate is flat); Unsloth's inference mode through
   ``../shared/bench/peer_unsloth_generate.py`` in its own process when ``unsloth`` imports.
Prints JSON lines, then one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_memory import materialize_rest, random_quantized_llama  # noqa: E402

ROWS: list[dict] = []


def emit(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def rotating_us(fn, items: list) -> float:
    """Median microseconds of one ``fn(*item)``, the calls rotating over ``items`` (so weights come from HBM, not L2)
    and replayed from one CUDA graph (no host launch cost, as in the decoder): bench/dequant.py's timer."""
    from dequant import time_graph

    return time_graph(lambda item: fn(*item), items)


def gemv_rotation(n: int, k: int, rows: int = 1) -> tuple[list, torch.Tensor, int]:
    """NF4 + DQ copies of a random [n, k] weight (> 200 MB in all, so every call reads HBM), an x [rows, k] and the
    bytes one GEMV moves (packed weight + 8-bit scales + nested scales + x + y): what the GEMV timers rotate over."""
    from kbit.quant import quantize_4bit

    copies = max(2, -(-200 * 2**20 // (n * k // 2)))
    qs = [quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4", 64, True)
          for _ in range(copies)]  # fmt: skip
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    packed, state = qs[0]
    nbytes = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * rows * (n + k)
    return qs, x, nbytes


def gemv_rows(copy_bw: float, label: str = "kbit", row_counts: tuple[int, ...] = (1, 4, 16)) -> None:
    from functools import partial

    from kbit.kernels import dispatch
    from kbit.quant import quantize_4bit

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except ImportError:
        bnb = None
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        copies = max(2, -(-200 * 2**20 // (n * k // 2)))  # > 200 MB of weights in rotation: never L2-resident
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        ours = [quantize_4bit(w, "nf4", 64, True) for w in weights]
        quant = partial(bf.quantize_4bit, blocksize=64, quant_type="nf4", compress_statistics=True) if bnb else None
        theirs = [quant(w) for w in weights] if bnb else []
        del weights
        packed, state = ours[0]
        for rows in row_counts:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            nbytes = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * rows * (n + k)
            us = rotating_us(partial(dispatch.gemv_4bit, x), ours)  # what the decoder calls: fused at 1 row
            row = dict(part="gemv", stack=label, shape=f"{n}x{k}", rows=rows, kbit_us=round(us, 1),
                       kbit_bw_frac=round(nbytes / (us * 1e-6) / copy_bw, 3))  # fmt: skip
            if theirs:
                bus = rotating_us(lambda p, s, x=x: bnb.matmul_4bit(x, p.t(), quant_state=s), theirs)
                row |= dict(bnb_us=round(bus, 1), bnb_bw_frac=round(nbytes / (bus * 1e-6) / copy_bw, 3))
            emit(**row)
        torch.cuda.empty_cache()


def sweep_configs(modes: tuple[int, ...] | None = None) -> dict[int, tuple[int, ...]]:
    """Time GEMV tilings (BLOCK_N, blocks per iteration, warps, stages, mode; ROWS: rows per group, groups per
    program, warps, stages, ROWS) at 1 row; returns the best over all shapes for each arithmetic mode (exact,
    factored, the no-table bandwidth probe, PRMT lookups, PRMT lookups over whole rows), and under the key None the
    fastest of the modes the decoder may use (factored, lut, rows)."""
    from functools import partial

    from kbit.kernels.triton import gemv4
    from kbit.quant import quantize_4bit

    modes = modes or (gemv4.EXACT, gemv4.FACTORED, gemv4.PROBE, gemv4.LUT, gemv4.ROWS)
    configs = [(bn, nb, w, 1, mode) for mode in modes if mode != gemv4.ROWS for bn in (4, 8, 16)
               for nb in (4, 8, 16, 32) for w in (2, 4, 8)]  # fmt: skip
    if gemv4.ROWS in modes:
        configs += [(rt, it, w, 1, gemv4.ROWS) for rt in (1, 2, 4, 8) for it in (2, 4, 8) for w in (4, 8, 16)]
    total = dict.fromkeys(configs, 0.0)
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        copies = max(2, -(-200 * 2**20 // (n * k // 2)))
        qs = [quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4", 64, True)
              for _ in range(copies)]  # fmt: skip
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for cfg in configs:
            try:
                total[cfg] += rotating_us(partial(gemv4.gemv_4bit, x, config=cfg), qs)
            except Exception as e:  # a tiling the compiler rejects (shared memory, registers)
                print(f"config {cfg}: {type(e).__name__}", flush=True)
                total[cfg] = float("inf")
        del qs
        torch.cuda.empty_cache()
    best = {}
    for mode in modes:
        ranked = sorted(((c, us) for c, us in total.items() if c[4] == mode), key=lambda kv: kv[1])
        emit(part="sweep", mode=mode, best=[dict(config=c, sum_us=round(us, 1)) for c, us in ranked[:5]])
        best[mode] = ranked[0][0]
    usable = [best[m] for m in (gemv4.FACTORED, gemv4.LUT, gemv4.ROWS) if m in best]
    best[None] = min(usable, key=total.__getitem__)
    return best


def add_adapters(model: nn.Module, rank: int = 16) -> None:
    """LoRA r on all seven projections, B random (an adapter after training is not zero)."""
    from kbit.lora import add_lora, lora_layers

    add_lora(model, r=rank, alpha=2 * rank, dropout=0.0, dtype=torch.bfloat16)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.01)
    model.eval()


def time_kbit(model: nn.Module, batch: int, prompt: int, new: int, label: str) -> None:
    from kbit.decode import decoder_for, pick

    vocab = model.config.vocab_size
    t0 = time.perf_counter()
    dec = decoder_for(model, batch, prompt + new)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    prompts = [torch.randint(0, vocab, (prompt,), device="cuda") for _ in range(batch)]
    for _ in range(2):  # the first pass warms the prefill shapes
        dec.pos.zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = torch.stack([dec.prefill(i, p) for i, p in enumerate(prompts)])
        tok = pick(first)
        tok.cpu()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new - 1):
            tok = pick(dec.step(tok))
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - t1
    emit(part="generate", stack=label, batch=batch, new_tokens=new, ttft_ms=round(ttft * 1e3, 1),
         tok_s_per_seq=round((new - 1) / decode_s, 1), tok_s_total=round(batch * (new - 1) / decode_s, 1),
         capture_s=round(capture_s, 2), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))  # fmt: skip


def profile_step(model: nn.Module, label: str, steps: int = 5) -> None:
    """GPU time per decode step by kernel (eager step, batch 1): where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from kbit.decode import Decoder

    dec = Decoder(model, 1, 256, graph=False)
    dec.pos.zero_()
    tok = dec.prefill(0, torch.randint(0, model.config.vocab_size, (32,), device="cuda")).argmax().view(1)
    for _ in range(3):
        tok = dec.step(tok).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in rows) / steps
    top = sorted(rows, key=lambda e: -getattr(e, "self_device_time_total", 0))[:25]
    emit(part="profile", stack=label, kernel_us_per_step=round(total, 1),
         kernels_per_step=round(sum(e.count for e in rows) / steps, 1),
         top=[dict(name=e.key[:90], us=round(e.self_device_time_total / steps, 1), calls=e.count // steps)
              for e in top])  # fmt: skip
    del dec
    torch.cuda.empty_cache()


def bnb_model(config) -> nn.Module:
    """transformers' Llama with bitsandbytes NF4 + DQ Linear4bit layers (random weights quantized by bnb)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and mod is not head:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
            w = torch.randn(mod.out_features, mod.in_features, dtype=torch.bfloat16, device="cuda") * 0.02
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                         blocksize=64).to("cuda")  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    materialize_rest(model, config)
    return model.eval()


def time_hf(model: nn.Module, batch: int, prompt: int, new: int, label: str) -> None:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kw)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    n = out.shape[1] - prompt
    emit(part="generate", stack=label, batch=batch, new_tokens=n, ttft_ms=round(ttft * 1e3, 1),
         tok_s_per_seq=round((n - 1) / max(total - ttft, 1e-9), 1),
         tok_s_total=round(batch * (n - 1) / max(total - ttft, 1e-9), 1))  # fmt: skip


def unsloth_rows(peer_dir: Path) -> None:
    script = peer_dir / "peer_unsloth_generate.py"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and "unsloth" in line:
            r = json.loads(line)
            rate = r["tok_per_s_per_seq"]
            emit(part="generate", stack="unsloth (its inference mode)", batch=r["batch"], new_tokens=r["new_tokens"],
                 tok_s_per_seq=rate, tok_s_total=round(rate * r["batch"], 1))  # fmt: skip
    if proc.returncode:
        emit(part="generate", stack="unsloth", error=proc.stderr.strip().splitlines()[-1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--peer-tokens", type=int, default=32)
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time GEMV tilings first (sets gemv4.CONFIG)")
    p.add_argument("--sweep-modes", type=int, nargs="+", default=None,
                   help="gemv4 modes to sweep (0 exact, 1 factored, 2 probe, 3 lut, 4 rows; default all)")  # fmt: skip
    p.add_argument("--gemv-config", default=None, help="BLOCK_N,NB,warps,stages,mode for gemv4.CONFIG (a sweep's)")
    p.add_argument("--profile", action="store_true", help="also profile one eager decode step by kernel")
    p.add_argument("--unsloth", action="store_true", help="also run Unsloth's inference mode (needs its wheels)")
    p.add_argument("--peer-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench",
                   help="folder of the peer scripts (../shared/bench)")  # fmt: skip
    args = p.parse_args()
    emit(part="device", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    bw = copy_bandwidth()
    emit(part="copy", tb_s=round(bw / 1e12, 3))
    if args.gemv_config:
        from kbit.kernels.triton import gemv4

        gemv4.CONFIG = tuple(int(v) for v in args.gemv_config.split(","))
    if args.sweep:
        from kbit.kernels.triton import gemv4

        best = sweep_configs(tuple(args.sweep_modes) if args.sweep_modes else None)
        if gemv4.EXACT in best:
            gemv4.CONFIG = best[gemv4.EXACT]
            gemv_rows(bw, "kbit exact", (1,))
        gemv4.CONFIG = best[None]  # the rest of the run uses the fastest of the decoder's modes (factored, lut, rows)
        emit(part="config", gemv=list(gemv4.CONFIG))
    if not args.skip_gemv:
        gemv_rows(bw)

    model, config = random_quantized_llama("llama-3-8b")
    model.eval()
    for b in args.batches:
        time_kbit(model, b, args.prompt, args.new_tokens, "kbit")
    if args.profile:
        profile_step(model, "kbit")
    add_adapters(model)
    for b in args.batches:
        time_kbit(model, b, args.prompt, args.new_tokens, "kbit + LoRA r16 (unmerged)")
    if args.profile:
        profile_step(model, "kbit + LoRA r16 (unmerged)")
    del model
    torch.cuda.empty_cache()

    if not args.skip_peers:
        hf = bnb_model(config)
        for b in args.batches:
            time_hf(hf, b, args.prompt, args.peer_tokens, "transformers + bnb")
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)).eval()
        time_hf(hf, 1, args.prompt, args.peer_tokens, "transformers + bnb + PEFT LoRA r16")
        del hf
        torch.cuda.empty_cache()
    if args.unsloth:
        unsloth_rows(args.peer_dir)

    print("\n| stack | batch | tokens/s per sequence | tokens/s total | time to first token (ms) |")
    print("|---|---|---|---|---|")
    for r in ROWS:
        if r["part"] == "generate" and "tok_s_per_seq" in r:
            print(
                f"| {r['stack']} | {r['batch']} | {r['tok_s_per_seq']} | {r['tok_s_total']} | {r.get('ttft_ms', '')} |"
            )
    print("\n| GEMV | shape | rows | kbit µs | kbit / copy bw | bnb µs | bnb / copy bw |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["part"] == "gemv":
            print(f"| {r['stack']} | {r['shape']} | {r['rows']} | {r['kbit_us']} | {r['kbit_bw_frac']} | "
                  f"{r.get('bnb_us', '')} | {r.get('bnb_bw_frac', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
