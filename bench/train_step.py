"""kbit's QLoRA training step, reference path against the fast path, with the peer stacks in the same table.

    python3 bench/train_step.py                                   # Llama-3-8B shape, batches 1 4 8 x 2048
    python3 bench/train_step.py --peers seed tuned tuned-liger unsloth
    python3 bench/train_step.py --modes fast-full fast-auto fast-offload fast-memory   # the memory plans
    python3 bench/train_step.py --device cpu --preset tiny --batches 1 --seq-len 64 --steps 2   # smoke test

Model: bench/train_memory.py's random Llama of the preset's shape (NF4 + double quant built directly on the device,
nothing downloaded; ``--layers N`` keeps the first N decoder layers' shape with fewer of them), LoRA r=16 alpha 32
dropout 0 on all seven projections (bf16), torch fused AdamW over the adapters, random tokens, loss on every
position. kbit modes (one process, in this order, since the fast path patches the model in place):
  reference       transformers' modules, full non-reentrant checkpointing, loss from float32 logits (the trainer's)
  fast-full       apply_fast_path (fused RMSNorm/SwiGLU/RoPE, chunked LM-head cross-entropy), full checkpointing
  fast-selective  the same, selective checkpointing (matmul and attention outputs kept, elementwise recomputed)
  fast-none       the same, no checkpointing (the most memory)
  fast-auto       the same, memory plan "speed" chosen per batch size from the free GPU memory (kbit.models.memory_plan:
                  as many layers as fit keep their activations, the rest recompute; the plan line is printed)
  fast-offload    the same, every layer recomputed from its input offloaded to pinned CPU memory (memory plan "memory")
  fast-memory     fast-offload with the input embedding table in CPU memory too (offload_input_embeddings; the
                  ids are looked up on the CPU and the rows copied over; it cannot be undone, so it runs last)
Each runs ``--warmup`` steps and then ``--steps`` timed ones; it reports the median step as tokens/s, and
torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps.

FLOPs, per token, counted from the shapes (P = frozen linear weights of the decoder layers, Ph = the LM head,
Pl = LoRA weights, A = causal attention forward, 2·T·d_attn per layer at sequence T):
  model FLOPs     = 4·(P + Ph) + 6·Pl + 3·A·layers     (forward, input gradients, LoRA weight gradients)
  with recompute  = model FLOPs + 2·(P + Pl) + A·layers  (full checkpointing replays the layers' forward)
For the Llama-3-8B shape at 2048 that is 31.9 and 46.5 GFLOP per token (Unsloth's 10,668 tokens/s is 43% and
63% of the peak). "% peak" divides the model FLOPs per second by ``--peak-tflops`` (790, the H100's bf16 dense
matmul rate); "% with recompute" counts what the backward really executes: the forward of every recomputed layer
(all of them in reference, fast-full, fast-offload and fast-memory, the plan's in fast-auto; fast-selective counts
as none).

``--peers`` runs the peer scripts of ../shared/bench (``--peer-dir``), one subprocess per stack after kbit's
model is freed, when their packages import (transformers + bitsandbytes + PEFT; Liger; Unsloth), and adds the
tokens/s and peak memory they print to the table: seed / seed-liger (the tutorials' recipe), tuned / tuned-liger
(bf16 adapters, non-reentrant checkpointing, fused AdamW), unsloth (its own defaults).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory import random_quantized_llama  # noqa: E402

MODES = ("reference", "fast-full", "fast-selective", "fast-none", "fast-auto", "fast-offload", "fast-memory")
TINY = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)  # fmt: skip
HF, LIGER = ["bitsandbytes", "peft"], ["bitsandbytes", "peft", "liger_kernel"]
PEERS = {  # name -> (script, extra args, packages it needs)
    "seed": ("peer_qlora_step.py", ["--recipe", "seed", "--liger", "0"], HF),
    "seed-liger": ("peer_qlora_step.py", ["--recipe", "seed", "--liger", "1"], LIGER),
    "tuned": ("peer_qlora_step.py", ["--recipe", "tuned", "--liger", "0"], HF),
    "tuned-liger": ("peer_qlora_step.py", ["--recipe", "tuned", "--liger", "1"], LIGER),
    "unsloth": ("peer_unsloth_step.py", [], ["unsloth"]),
}


def flops_per_token(config, seq_len: int, r: int) -> tuple[float, float]:
    """(model FLOPs, FLOPs with full recompute) per token of a LoRA step, as the module docstring counts them."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # (in, out) of the 7
    p = layers * sum(i * o for i, o in shapes)
    pl = layers * sum(r * (i + o) for i, o in shapes)
    ph = h * config.vocab_size
    attn = layers * 2 * seq_len * q  # causal: QKᵀ and AV over T/2 positions on average, 2 FLOPs a MAC
    model = 4 * (p + ph) + 6 * pl + 3 * attn
    return model, model + 2 * (p + pl) + attn


def build(preset: str, layers: int | None, device: str):
    """The random NF4 Llama with bf16 LoRA, in train mode, and its config."""
    from kbit.estimate import PRESETS
    from kbit.lora import add_lora

    if preset == "tiny":
        PRESETS.setdefault("tiny", TINY)  # a bench-only shape: random_quantized_llama reads presets by name
    if layers:
        name = f"{preset}-{layers}l"
        PRESETS.setdefault(name, dict(PRESETS[preset], num_hidden_layers=layers))
        preset = name
    model, config = random_quantized_llama(preset, device)
    add_lora(model, r=16, alpha=32, dropout=0.0, dtype=torch.bfloat16)
    return model.train(), config


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def set_mode(model, mode: str, batch: int, seq_len: int) -> tuple[str, int]:
    """Apply ``mode``'s checkpointing for this batch size; (the line saying what, decoder layers recomputed)."""
    from kbit.estimate import OPTIMIZER_BYTES
    from kbit.models.checkpointing import decoder_layers, set_checkpointing
    from kbit.models.memory_plan import plan_memory, step_bytes
    from kbit.models.offload import offload_input_embeddings

    n = len(decoder_layers(model))
    if mode == "fast-auto":  # the trainer's "speed" plan: the fused loss, torch AdamW's two moments per parameter
        reserve = step_bytes(model, batch, seq_len, OPTIMIZER_BYTES["adamw"], fused_loss=True)
        plan = plan_memory(model, "speed", batch, seq_len, reserve_bytes=reserve)
        set_checkpointing(model, plan.modes)
        return plan.line, n - plan.modes.count("none")
    if mode == "fast-memory":
        return f"{set_checkpointing(model, 'offload')}; {offload_input_embeddings(model)}", n
    checkpointing = {"reference": "full", "fast-offload": "offload"}.get(mode, mode.removeprefix("fast-"))
    return set_checkpointing(model, checkpointing), 0 if checkpointing in ("none", "selective") else n


def run_mode(model, config, mode: str, batch: int, seq_len: int, warmup: int, steps: int, device: str) -> dict:
    """Time one mode at one batch size; the row of the table as a dict (or {'oom': True})."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    times = []
    loss = None
    try:
        for i in range(warmup + steps):
            if i == warmup and device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            sync(device)
            t = time.perf_counter()
            if mode == "reference":  # kbit's trainer: logits, then float32 cross-entropy
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
                del logits
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"oom": True}
    finally:
        del opt
        gc.collect()
    step = statistics.median(times[warmup:])
    row = {"step_s": step, "tokens_per_s": batch * seq_len / step, "loss": float(loss)}
    if device == "cuda":
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.empty_cache()
    return row


def run_peer(name: str, peer_dir: Path, batches: list[int], seq_len: int) -> list[dict]:
    """One peer stack in its own process; the rows it prints (JSON lines with tokens_per_s)."""
    script, extra, needs = PEERS[name]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        print(f"peer {name}: skipped, {', '.join(missing)} not installed", flush=True)
        return []
    configs = ",".join(f"{b}x{seq_len}" for b in batches)
    args = [configs] if script == "peer_unsloth_step.py" else ["--configs", configs, *extra]
    print(f"peer {name}: python {script} {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, str(peer_dir / script), *args], capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{") and ("tokens_per_s" in line or '"oom"' in line):
            rec = json.loads(line)
            rows.append({"stack": name, "batch": int(rec["config"].split("x")[0]), **rec})
    if proc.returncode != 0:
        print(f"peer {name}: exit {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
    return rows


def main() -> None:
    """Run kbit's modes (and the peers) at each batch size and print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b", help="a kbit.estimate preset, or 'tiny' (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--peers", nargs="*", default=[], choices=list(PEERS))
    ap.add_argument("--peer-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args()
    from kbit.models.patch import apply_fast_path

    t = time.perf_counter()
    model, config = build(args.preset, args.layers, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"built {args.preset} ({config.num_hidden_layers} layers) in {time.perf_counter() - t:.0f} s on {name}")
    model_flops, hw_flops = flops_per_token(config, args.seq_len, r=16)
    print(f"FLOPs per token: {model_flops / 1e9:.1f} G model, {hw_flops / 1e9:.1f} G with full recompute", flush=True)
    rows = []
    for mode in [m for m in MODES if m in args.modes]:  # reference first: the fast path patches in place
        if mode != "reference":
            print(apply_fast_path(model), flush=True)
        for b in args.batches:
            line, recomputed = set_mode(model, mode, b, args.seq_len)
            print(line, flush=True)
            stack = f"kbit {mode}" + (f" ({recomputed}/{config.num_hidden_layers} recomputed)" * (mode == "fast-auto"))
            row = {"stack": stack, "batch": b, "recomputed_layers": recomputed} | run_mode(
                model, config, mode, b, args.seq_len, args.warmup, args.steps, args.device
            )
            if not row.get("oom"):
                share = recomputed / config.num_hidden_layers
                recompute = model_flops + share * (hw_flops - model_flops)
                row["pct_peak"] = 100 * row["tokens_per_s"] * model_flops / (args.peak_tflops * 1e12)
                row["pct_with_recompute"] = 100 * row["tokens_per_s"] * recompute / (args.peak_tflops * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    for peer in args.peers:
        for row in run_peer(peer, args.peer_dir, args.batches, args.seq_len):
            if "tokens_per_s" in row:
                row["pct_peak"] = 100 * row["tokens_per_s"] * model_flops / (args.peak_tflops * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n| stack | batch x {args.seq_len} | tokens/s | peak alloc GiB | peak reserved GiB | % peak | "
          "% with recompute |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['stack']} | {r['batch']} | OOM | | | | |")
            continue
        cells = [f"{r['tokens_per_s']:,.0f}"] + [
            f"{r[k]:.2f}" if k in r else "" for k in ("peak_alloc_gib", "peak_reserved_gib")
        ] + [f"{r[k]:.1f}" if k in r else "" for k in ("pct_peak", "pct_with_recompute")]  # fmt: skip
        print(f"| {r['stack']} | {r['batch']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
