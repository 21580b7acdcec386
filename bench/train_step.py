"""kbit's QLoRA training step, reference path against the fast path, with the peer stacks in the same table.

    python3 bench/train_step.py                                   # Llama-3-8B shape, batches 1 4 8 x 2048
    python3 bench/train_step.py --peers seed tuned tuned-liger unsloth
    python3 bench/train_step.py --modes fast-full fast-auto fast-offload fast-memory   # the memory plans
    python3 bench/train_step.py --device cpu --preset tiny --batches 1 --seq-len 64 --steps 2   # smoke test
    python3 bench/train_step.py --modes fast-auto --batches 8 --warmup 1 --steps 3 --profile    # GPU time per class
    python3 bench/train_step.py --modes fast-auto --batches 1 --seq-len 400000 --warmup 0 --steps 1  # long context
    python3 bench/train_step.py --modes fast-memory --batches 1 --cuda-graph --optim paged_adamw_8bit  # memory, 1x2048

Model: bench/train_memory.py's random Llama of the preset's shape (NF4 + double quant built directly on the device,
nothing downloaded; ``--layers N`` keeps the first N decoder layers' shape with fewer of them), LoRA r=16 alpha 32
dropout 0 on all seven projections (bf16), torch fused AdamW over the adapters (``--optim``: another of kbit's
optimizers, e.g. paged_adamw_8bit, whose state waits in pinned host memory), random tokens, loss on every
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

Each row also reports peak pinned host memory (kbit's offload buffers, each exactly its layer input's bytes, plus
torch's pinned allocator: fast-memory's looked-up embedding rows) and the process's peak resident host memory; on
CUDA a line under the row splits the peak allocated memory into frozen weights, trainable parameters, their
gradients, optimizer state and the rest, with what the first timed step held after its forward and its peak up to
then. Every mode applies its memory plan with kbit.models.memory_plan.apply_plan (checkpointing per layer, and the
recomputed layers' patched MLP in pieces: at 8 x 2048 two of 8192 tokens). Before a mode runs, the bench checks that
the model passes no attention mask to its layers (transformers' SDPA path at batch 1 without padding: causal
attention without a T x T mask; another attention implementation would build one) and, on CUDA, that the layer
inputs the plan offloads fit the host's available memory; a mode that fails either is reported and skipped rather
than run into an out-of-memory kill. ``--mlp-chunk N`` forces the patched MLP to run inputs longer than N tokens in
pieces of N in every layer (0: never; default: kbit's rules, pieces of 16,384 tokens above 16,384 for the 8B shape in
kept layers, kbit.models.patch.recompute_chunk_rows in recomputed ones); ``--sdpa-backend`` restricts PyTorch's
attention kernels (flash, efficient, cudnn, math).

``--profile`` runs one more step of each mode and batch under torch.profiler (after the timed ones, so its overhead
stays out of the table) and prints the GPU time of its kernels by class: 4-bit dequant (kbit's Triton dequantize),
bf16 matmul (cuBLAS kernels of the base projections), LoRA small matmuls (a matmul with a dimension of 64 or less),
attention (SDPA's kernels, forward and backward), fused norm/rope/swiglu (kbit's Triton kernels), LM head +
cross-entropy (the head's matmuls, a dimension equal to the vocabulary, and the fused loss), copies/offload (memcpy,
memset, dtype and layout copies), other (elementwise adds, LoRA scaling, the optimizer). Kernels are classed by
their name and by the CPU ops that launched them (their input shapes, the autograd Function around them). On a CPU
the same table gives each op's self CPU time. ``--trace FILE`` also writes the Chrome trace of that step.
``--host-profile N`` runs one more step under cProfile (its N most expensive Python functions: where a host-bound
step's time goes), ``--sync-debug`` one under torch.profiler listing the CUDA calls that made the host wait (with the
ops and frames around them), ``--memory-snapshot FILE`` one recording the allocator's history (with ``--cuda-graph``:
the capture) for ``bench/peak_memory.py``, which prints what is alive at the step's peak. Each CUDA row also reports
``host_ms``, the host time to queue one step without waiting for the GPU.

``--cuda-graph`` captures each mode's forward and backward in a CUDA graph after the warm-up (kbit.train.cuda_graph;
the optimizer runs outside it, so any ``--optim`` works; with plan memory the larger weights are rebuilt in row
pieces, which only pays inside a graph).

``--peers`` runs the peer scripts of ../shared/bench (``--peer-dir``), one subprocess per stack after kbit's
model is freed, when their packages import (transformers + bitsandbytes + PEFT; Liger; Unsloth), and adds the
tokens/s and peak memory they print to the table: seed / seed-liger (the tutorials' recipe), tuned / tuned-liger
(bf16 adapters, non-reentrant checkpointing, fused AdamW), unsloth (its own defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import resource
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
GIB = 2**30
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
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


def set_mode(model, mode: str, batch: int, seq_len: int, graphed: bool = False) -> tuple[str, int, tuple[str, ...]]:
    """Apply ``mode``'s memory plan for this batch size (apply_plan: checkpointing per layer, the MLP pieces of the
    recomputed layers; with ``graphed``, plan memory's weight row pieces); (the line saying what, decoder layers
    recomputed, the mode of each layer)."""
    from kbit.estimate import OPTIMIZER_BYTES
    from kbit.models.memory_plan import RECOMPUTED, apply_plan, plan_memory, step_bytes
    from kbit.models.offload import offload_input_embeddings

    if mode == "fast-auto":  # the trainer's "speed" plan: the fused loss, torch AdamW's two moments per parameter
        reserve = step_bytes(model, batch, seq_len, OPTIMIZER_BYTES["adamw"], fused_loss=True)
        plan = plan_memory(model, "speed", batch, seq_len, reserve_bytes=reserve)
    else:
        kind = {"reference": "full", "fast-offload": "offload", "fast-memory": "memory"}.get(mode)
        plan = plan_memory(model, kind or mode.removeprefix("fast-"), batch, seq_len, why=f"bench mode {mode}",
                           weight_pieces=graphed)  # fmt: skip
    line = f"{plan.line}; {apply_plan(model, plan)}"
    if mode == "fast-memory":  # the trainer's memory plan on CUDA: the embedding table in host memory too
        line += f"; {offload_input_embeddings(model)}"
    recomputed = sum(m in RECOMPUTED for m in plan.modes)  # selective counts as none
    return line, recomputed, plan.modes


class _Captured(Exception):
    """Raised by check_attention_mask's hook: the first decoder layer's arguments are in hand."""


def check_attention_mask(model, device: str) -> torch.Tensor | None:
    """The attention mask ``model`` hands its decoder layers for 8 tokens of one unpadded sequence (None: causal
    attention with no mask, what SDPA does; a tensor here grows as T x T with the sequence)."""
    from kbit.models.checkpointing import decoder_layers

    seen = {}

    def grab(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 8), dtype=torch.long, device=device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    mask = seen.get("mask")
    return mask if isinstance(mask, torch.Tensor) else None


def pinned_need(model, modes: tuple[str, ...], mode: str, batch: int, seq_len: int) -> int:
    """Pinned host bytes a step of ``modes`` takes: each offloaded layer input exactly (kbit's host buffers, to the
    page) and, with fast-memory, the looked-up embedding rows as one block of torch's pinned allocator (rounded up to
    a power of two)."""
    from kbit.estimate import pinned_bytes

    itemsize = model.get_input_embeddings().weight.element_size()
    nbytes = batch * seq_len * model.config.hidden_size * itemsize
    rows = 1 << (nbytes - 1).bit_length() if mode == "fast-memory" else 0
    return modes.count("offload") * pinned_bytes(nbytes) + rows


def host_available() -> int | None:
    """Bytes the host can still give (MemAvailable of /proc/meminfo, plus the pinned blocks torch holds cached)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    if kib is None:
        return None
    cached = 0
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats"):
        stats = torch.cuda.host_memory_stats()
        cached = stats.get("allocated_bytes.current", 0) - stats.get("active_bytes.current", 0)
    return kib * 1024 + max(0, cached)


def host_row(device: str) -> dict:
    """Peak pinned host GiB since the last reset (kbit's offload buffers plus torch's pinned pool, each at its own
    peak) and the process's peak resident GiB."""
    from kbit.models.offload import pinned_host_bytes

    row = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device == "cuda":
        pinned = pinned_host_bytes()[1]
        if hasattr(torch.cuda, "host_memory_stats"):
            pinned += torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)
        row["peak_pinned_gib"] = pinned / GIB
    return row


def train_step(model, opt, mode: str, ids: torch.Tensor, marks: dict | None = None) -> torch.Tensor:
    """One optimizer step on ``ids``; the loss. With ``marks`` (CUDA), the bytes allocated after the forward and the
    allocator's peak up to then (its host-side counters: no synchronisation)."""
    loss = forward_backward(model, mode, ids, marks)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def graphed_step(graphed, opt, ids: torch.Tensor) -> torch.Tensor:
    """One step through a GraphedStep (its replay adds the gradients) and the optimizer outside it."""
    loss = graphed.step({"ids": ids})
    opt.step()
    opt.zero_grad(set_to_none=False)  # the graph adds into these tensors
    return loss


def forward_backward(model, mode: str, ids: torch.Tensor, marks: dict | None = None) -> torch.Tensor:
    """The loss on ``ids`` and its gradients (train_step without the optimizer: what a CUDA graph captures)."""
    if mode == "reference":  # kbit's trainer: logits, then float32 cross-entropy
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        del logits
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    if marks is not None:
        marks.update(after_forward=torch.cuda.memory_allocated(), forward_peak=torch.cuda.max_memory_allocated())
    loss.backward()
    return loss.detach()


def run_mode(model, config, mode: str, batch: int, seq_len: int, warmup: int, steps: int, device: str,
             profile: bool = False, trace: Path | None = None, optim: str = "adamw",
             cuda_graph: bool = False, host_profile: int = 0, sync_debug: bool = False,
             memory_snapshot: Path | None = None) -> dict:  # fmt: skip
    """Time one mode at one batch size; the row of the table as a dict (or {'oom': True}); with ``profile``, one more
    step under torch.profiler, its time per kernel class in the row's 'profile'. With ``cuda_graph`` the step is
    captured in the last warm-up step and replayed (kbit.train.cuda_graph; peak memory then counts from the capture)."""
    from kbit.models.offload import reset_pinned_host_peak
    from kbit.optim import build_optimizer
    from kbit.train.cuda_graph import GraphedStep, check_graphable

    params = [p for p in model.parameters() if p.requires_grad]
    graphed = None
    opt = build_optimizer(optim, params, lr=1e-4)
    if cuda_graph:
        if warmup < 1:
            raise SystemExit("train_step: --cuda-graph needs --warmup >= 1 (the capture is the last warm-up step)")
        check_graphable(model)
        # packed=False: each row is one random sequence, so the captured attention needs no mask
        graphed = GraphedStep(lambda b: forward_backward(model, mode, b["ids"]), params, warmup - 1, packed=False)
    times = []
    loss = None
    first: dict = {}  # the first timed step's marks (train_step)
    try:
        for i in range(warmup + steps):
            if i == warmup - (graphed is not None) and device == "cuda":  # with a graph: from its capture on
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                reset_pinned_host_peak()
                if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                    torch.cuda.reset_peak_host_memory_stats()
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            sync(device)
            t = time.perf_counter()
            marks = {} if i == warmup and device == "cuda" and not graphed else None  # the first timed step
            if graphed and memory_snapshot is not None and i == warmup - 1:  # the capture and its first replay
                snapshot_step(functools.partial(graphed_step, graphed, opt, ids), memory_snapshot)
                loss = graphed.loss
            elif graphed:  # the optimizer outside the graph
                loss = graphed_step(graphed, opt, ids)
            else:
                loss = train_step(model, opt, mode, ids, marks)
            sync(device)
            times.append(time.perf_counter() - t)
            if marks is not None:
                first = marks
        step = statistics.median(times[warmup:])
        row = {"step_s": step, "tokens_per_s": batch * seq_len / step, "loss": float(loss)}
        if device == "cuda":
            row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            row |= memory_breakdown(model, opt, row["peak_alloc_gib"], first)
        row |= host_row(device)
        if device == "cuda" and not graphed:  # how long the host takes to queue one step (no sync inside)
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            sync(device)
            t = time.perf_counter()
            train_step(model, opt, mode, ids)
            row["host_ms"] = (time.perf_counter() - t) * 1e3
            sync(device)
        if sync_debug and device == "cuda" and not graphed:
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            row["host_syncs"] = find_syncs(functools.partial(train_step, model, opt, mode, ids))
        if memory_snapshot is not None and device == "cuda" and not graphed:  # (graphed: at the capture, above)
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            snapshot_step(functools.partial(train_step, model, opt, mode, ids), memory_snapshot)
        if host_profile and not graphed:
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            host_profile_step(functools.partial(train_step, model, opt, mode, ids), device, host_profile)
        if profile and graphed:
            print("  (--profile: not with --cuda-graph; the replayed kernels have no launching ops to class by)")
        elif profile:
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
            one_step = functools.partial(train_step, model, opt, mode, ids)
            row["profile"] = profile_step(one_step, device, config.vocab_size, trace)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"oom": True}
    finally:
        del opt
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cudaStreamQuery")  # fmt: skip


def find_syncs(step) -> list[str]:
    """Run ``step`` once under torch.profiler; where the host waited on the GPU (CUDA runtime calls that
    synchronise), one line each: count x the call <- the ops around it <- the innermost Python frames of kbit,
    transformers or the bench."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    seen: dict[str, list] = {}
    for e in prof.events():
        if e.name not in SYNC_CALLS:
            continue
        chain, stack, p = [], [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            if not stack and p.stack:
                stack = [s for s in p.stack if any(k in s for k in ("kbit", "transformers", "bench"))][:3]
            p = p.cpu_parent
        key = f"{e.name} <- {' <- '.join(chain[:3])} | {' <- '.join(Path(s).name for s in stack)}"
        seen.setdefault(key, [0, 0.0])
        seen[key][0] += 1
        seen[key][1] += e.cpu_time_total / 1e3
    lines = [f"{n} x {ms:.1f} ms: {key}" for key, (n, ms) in sorted(seen.items(), key=lambda kv: -kv[1][1])]
    print("host syncs in one step:" + "".join(f"\n  {line}" for line in lines) if lines else "host syncs: none",
          flush=True)  # fmt: skip
    return lines


def snapshot_step(step, path: Path) -> None:
    """Run ``step`` once recording the CUDA allocator's history; write its snapshot (bench/peak_memory.py reads it)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        # A recomputation stops early by raising inside the layer; the recorder's Python frames lose that exception
        # (SystemError), so the replays run to the end of their layer here (a few transient tensors more).
        with set_checkpoint_early_stop(False):
            step()
        torch.cuda.synchronize()
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f"memory snapshot of one step: {path}", flush=True)


def host_profile_step(step, device: str, top: int) -> None:
    """Run ``step`` once under cProfile and print its ``top`` functions by own time (where the host time goes)."""
    import cProfile
    import pstats

    sync(device)
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    sync(device)
    stats = pstats.Stats(prof)
    print(f"\nhost profile of one step (cProfile, its overhead included): top {top} functions by own time", flush=True)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def memory_breakdown(model, opt, peak_gib: float, marks: dict) -> dict:
    """Where a CUDA row's peak goes, in GiB: frozen weights (parameters without gradients and buffers), trainable
    parameters, their gradients (full size, though part of them may not exist yet at the peak), optimizer state,
    the rest of the peak (activations, the loss's chunk, dequantized weights, workspaces), and from the first timed
    step what its forward left allocated and its peak up to the end of the forward (the loss included)."""
    seen: set[int] = set()

    def gib(tensors) -> float:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if t.device.type == "cuda" and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total / GIB

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    parts = {
        "frozen_gib": gib([p for p in params if not p.requires_grad] + list(model.buffers())),
        "trainable_gib": gib(trainable),
        "grads_gib": sum(p.numel() * p.element_size() for p in trainable if p.is_cuda) / GIB,
        "optimizer_gib": gib([v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]),
    }
    parts["rest_gib"] = peak_gib - sum(parts.values())
    parts["after_forward_gib"] = marks.get("after_forward", 0) / GIB
    parts["forward_peak_gib"] = marks.get("forward_peak", 0) / GIB
    return parts


def print_breakdown(row: dict) -> None:
    """One line: where a CUDA row's peak allocated memory goes (:func:`memory_breakdown`)."""
    print(f"  peak {row['peak_alloc_gib']:.2f} GiB = frozen weights {row['frozen_gib']:.2f} + trainable "
          f"{row['trainable_gib']:.2f} + their grads {row['grads_gib']:.2f} + optimizer {row['optimizer_gib']:.2f} + "
          f"rest {row['rest_gib']:.2f} (activations, loss chunk, dequantized weights, workspaces); the first timed "
          f"step held {row['after_forward_gib']:.2f} after its forward and peaked at {row['forward_peak_gib']:.2f} "
          "up to it (the loss included)", flush=True)  # fmt: skip


# ---- one step's time by kernel class (--profile) ----

KERNEL_CLASSES = ("4-bit dequant", "bf16 matmul", "LoRA small matmuls", "attention", "fused norm/rope/swiglu",
                  "LM head + cross-entropy", "copies/offload", "other")  # fmt: skip
TOP_KERNELS = 25  # --profile also lists this many of the most expensive kernels by name
LORA_RANK = 16  # the bench's adapters: a matmul with a dimension of this size is a LoRA one
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::mv",
              "aten::addmv"}  # fmt: skip
ATTENTION_WORDS = ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")
FUSED_WORDS = ("rms_norm", "rmsnorm", "_rope_", "rotary", "swiglu")
COPY_WORDS = ("memcpy", "memset", "copy")
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::clone", "aten::contiguous",
            "aten::pin_memory", "aten::_pin_memory"}  # fmt: skip


def kernel_class(name: str, ops: list[str], shapes: list, vocab: int, rank: int = LORA_RANK) -> str:
    """The class (of KERNEL_CLASSES) of a GPU kernel or CPU op ``name``, from its name, the CPU ops around its launch
    (``ops``, innermost first; on a CPU the op itself first) and the innermost op's input ``shapes``."""
    low, chain = name.lower(), [o.lower() for o in ops]
    innermost = chain[0] if chain else ""
    if "dequant" in low:  # kbit's Triton dequantize kernel
        return "4-bit dequant"
    if any(word in s for s in (low, *chain) for word in ATTENTION_WORDS):
        return "attention"
    if innermost in MATMUL_OPS:
        dims = [d for shape in shapes if len(shape) >= 2 for d in shape[-2:]]
        if vocab in dims:
            return "LM head + cross-entropy"
        return "LoRA small matmuls" if rank in dims else "bf16 matmul"
    if any("linearcrossentropy" in s for s in chain) or "ce_chunk" in low or "cross_entropy" in low:
        return "LM head + cross-entropy"
    if any(word in s for s in (low, *chain) for word in FUSED_WORDS):
        return "fused norm/rope/swiglu"
    if any("dequantlinear" in s or "loralinearfunction" in s for s in chain):  # the PyTorch (CPU) dequantize
        # inside the frozen linear, alone or fused with its LoRA branch
        return "4-bit dequant"
    if any(word in low for word in COPY_WORDS) or innermost in COPY_OPS:
        return "copies/offload"
    return "other"


def _op_chain(event) -> list[str]:
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    return chain


def profile_step(step, device: str, vocab: int, trace: Path | None = None) -> dict:
    """Run ``step`` once under torch.profiler; {'wall_ms', 'ms': {class: GPU kernel ms (CPU: self CPU ms)}}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        t = time.perf_counter()
        with record_function("kbit train step"):
            step()
        sync(device)
        wall = time.perf_counter() - t
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    top: dict[tuple[str, str], float] = {}  # (class, kernel or op name) -> ms
    events = prof.events()
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        chain = _op_chain(e)
        if device == "cuda":
            for k in e.kernels:  # the kernels this op launched itself (not its children's)
                cls = kernel_class(k.name, chain, e.input_shapes, vocab)
                key = (cls, f"{k.name[:90]} <- {chain[0] if chain else '?'}")
                top[key] = top.get(key, 0.0) + k.duration / 1e3
        else:
            cls = kernel_class(e.name, chain, e.input_shapes, vocab)
            top[(cls, e.name)] = top.get((cls, e.name), 0.0) + e.self_cpu_time_total / 1e3
    if device == "cuda":  # kernels launched outside any recorded op (none expected) count as other
        # Device events include user annotations (record_function ranges mirrored on the GPU): not kernels.
        on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        total = sum(e.time_range.elapsed_us() for e in on_gpu if not getattr(e, "is_user_annotation", False)) / 1e3
        unattributed = max(0.0, total - sum(top.values()))
        top[("other", "kernels launched outside any recorded op")] = unattributed
    ms = dict.fromkeys(KERNEL_CLASSES, 0.0)
    for (cls, _), v in top.items():
        ms[cls] += v
    ranked = sorted(top.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"wall_ms": wall * 1e3, "ms": ms, "top": [(cls, name, round(v, 2)) for (cls, name), v in ranked]}


def print_profile(stack: str, batch: int, seq_len: int, prof: dict, device: str) -> None:
    """The profile of one step as a markdown table."""
    total = sum(prof["ms"].values())
    what = "GPU kernel time (summed over streams: offload copies overlap compute)" if device == "cuda" else (
        "self CPU time")  # fmt: skip
    print(f"\nprofile, {stack} at {batch}x{seq_len}: one step took {prof['wall_ms']:.1f} ms under the profiler; "
          f"{what} {total:.1f} ms")  # fmt: skip
    print("| kernel class | ms | % |\n|---|---|---|")
    for name in KERNEL_CLASSES:
        print(f"| {name} | {prof['ms'][name]:.1f} | {100 * prof['ms'][name] / max(total, 1e-9):.1f} |")
    print(f"\ntop {len(prof['top'])} kernels (name <- the op that launched it):")
    print("| class | kernel | ms |\n|---|---|---|")
    for cls, name, v in prof["top"]:
        print(f"| {cls} | {name} | {v:.1f} |")


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


def sdpa_context(backend: str):
    """PyTorch's attention restricted to ``backend`` (``auto``: PyTorch's own choice)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, kinds[backend])])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run kbit's modes (and the peers) at each batch size and print one table; returns its rows."""
    from kbit.optim import OPTIMIZERS

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
    ap.add_argument("--mlp-chunk", type=int, default=None,
                    help="patched MLP: pieces of N tokens above N (0: never; default: the automatic rule)")  # fmt: skip
    ap.add_argument("--sdpa-backend", default="auto", choices=SDPA_BACKENDS, help="restrict PyTorch's attention")
    ap.add_argument("--profile", action="store_true", help="one more step per row under torch.profiler: time by class")
    ap.add_argument("--trace", type=Path, default=None, help="with --profile: write the last row's Chrome trace here")
    ap.add_argument(
        "--optim",
        default="adamw",
        choices=OPTIMIZERS,
        help="kbit rows' optimizer (kbit.optim.build_optimizer; adamw: torch's fused AdamW)",
    )
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each kbit step's forward and backward in a CUDA graph and replay it, the optimizer outside "
        "(kbit.train.cuda_graph)",
    )
    ap.add_argument(
        "--lora-groups",
        default="on",
        choices=("on", "off"),
        help="off: every LoRA projection its own fused node (kbit.lora.grouped's groups undone)",
    )
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="one more step per row under cProfile: its N most expensive functions")  # fmt: skip
    ap.add_argument(
        "--sync-debug",
        action="store_true",
        help="one more step per row under torch.profiler: where the host waits on the GPU",
    )
    ap.add_argument(
        "--memory-snapshot",
        type=Path,
        default=None,
        metavar="FILE",
        help="one more step recording the allocator's history into FILE (bench/peak_memory.py)",
    )
    ap.add_argument("--peers", nargs="*", default=[], choices=list(PEERS))
    ap.add_argument("--peer-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args(argv)
    if args.mlp_chunk is not None and args.mlp_chunk < 0:
        ap.error(f"--mlp-chunk must be 0 (never) or a number of tokens, got {args.mlp_chunk}")
    from kbit.lora import group_lora
    from kbit.models.patch import apply_fast_path, mlp_chunking

    t = time.perf_counter()
    model, config = build(args.preset, args.layers, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"built {args.preset} ({config.num_hidden_layers} layers) in {time.perf_counter() - t:.0f} s on {name}")
    model_flops, hw_flops = flops_per_token(config, args.seq_len, r=16)
    print(f"FLOPs per token: {model_flops / 1e9:.1f} G model, {hw_flops / 1e9:.1f} G with full recompute", flush=True)
    mask = check_attention_mask(model, args.device)
    if mask is not None:
        mask_gib = max(args.batches) * args.seq_len**2 * mask.element_size() / GIB
        why = (f"the attention ({config._attn_implementation}) gets a {tuple(mask.shape)} mask at 8 tokens: "
               f"{mask_gib:.1f} GiB at {max(args.batches)}x{args.seq_len}")  # fmt: skip
        if mask_gib > 1:
            sys.exit(f"train_step: {why}; run with sdpa attention (causal, no mask) for long sequences")
        print(f"note: {why}", flush=True)
    rows = []
    for mode in [m for m in MODES if m in args.modes]:  # reference first: the fast path patches in place
        if mode != "reference":
            print(apply_fast_path(model), flush=True)
            if args.lora_groups == "off":
                print(f"LoRA groups off: {group_lora(model, on=False)} grouped", flush=True)
        for b in args.batches:
            chunking = mlp_chunking(model, args.mlp_chunk) if args.mlp_chunk is not None else contextlib.nullcontext()
            with chunking, sdpa_context(args.sdpa_backend):
                line, recomputed, modes = set_mode(model, mode, b, args.seq_len, args.cuda_graph)
                print(line, flush=True)
                stack = (
                    f"kbit {mode}"
                    + (f" ({recomputed}/{config.num_hidden_layers} recomputed)" * (mode == "fast-auto"))
                    + f", {args.optim}" * (args.optim != "adamw")
                    + ", CUDA graph" * args.cuda_graph
                )
                row = {"stack": stack, "batch": b, "recomputed_layers": recomputed}
                need, avail = pinned_need(model, modes, mode, b, args.seq_len), host_available()
                if args.device == "cuda" and avail is not None and need > avail:
                    row["skipped"] = (f"needs {need / GIB:.0f} GiB of pinned host memory for its offloaded "
                                      f"layer inputs (blocks rounded up to powers of two), {avail / GIB:.0f} GiB "
                                      "available")  # fmt: skip
                else:
                    row |= run_mode(model, config, mode, b, args.seq_len, args.warmup, args.steps, args.device,
                                    args.profile, args.trace, args.optim, args.cuda_graph,
                                    args.host_profile, args.sync_debug, args.memory_snapshot)  # fmt: skip
            if "tokens_per_s" in row:
                share = recomputed / config.num_hidden_layers
                recompute = model_flops + share * (hw_flops - model_flops)
                row["pct_peak"] = 100 * row["tokens_per_s"] * model_flops / (args.peak_tflops * 1e12)
                row["pct_with_recompute"] = 100 * row["tokens_per_s"] * recompute / (args.peak_tflops * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "frozen_gib" in row:
                print_breakdown(row)
            if "profile" in row:
                print_profile(stack, b, args.seq_len, row["profile"], args.device)
            if args.device == "cuda" and hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()  # the next row pins its own blocks: count them, not these
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
    print(f"\n| stack | batch x {args.seq_len} | tokens/s | peak alloc GiB | peak reserved GiB | peak pinned GiB | "
          "peak RSS GiB | % peak | % with recompute |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom") or r.get("skipped"):
            print(f"| {r['stack']} | {r['batch']} | {'OOM' if r.get('oom') else 'skipped: ' + r['skipped']} "
                  "| | | | | | |")  # fmt: skip
            continue
        keys = ("peak_alloc_gib", "peak_reserved_gib", "peak_pinned_gib", "peak_rss_gib")
        cells = [f"{r['tokens_per_s']:,.0f}"] + [f"{r[k]:.2f}" if k in r else "" for k in keys] + [
            f"{r[k]:.1f}" if k in r else "" for k in ("pct_peak", "pct_with_recompute")
        ]  # fmt: skip
        print(f"| {r['stack']} | {r['batch']} | {' | '.join(cells)} |")
    return rows


if __name__ == "__main__":
    main()
