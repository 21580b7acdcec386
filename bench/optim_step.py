"""Optimizer step time and GPU memory: kbit's AdamWs against torch's fused AdamW and bitsandbytes' 8-bit ones.

Two cases, one run: the LoRA parameters of Llama-3-8B (r=16 on all 7 linears of 32 layers: 448 tensors, 41.9M
fp32 parameters) and full tuning of a Llama-3.2-1B-shaped model (1.24B fp32 parameters, 146 tensors). Each
optimizer gets the same parameters and fixed random gradients; "state held" is the GPU memory still allocated
after a step beyond parameters and gradients (bitsandbytes' paged states are CUDA managed memory, which
torch's allocator does not count), "peak" the most allocated during a step, "time" the mean of timed steps
with the device synchronised after the last one. Where the time goes: "host" is how long ``step()`` takes to
return (the CPU enqueueing the step's work; when it is close to the step time the step is bound by the host,
not the GPU), "synced" the time of a step followed by a device synchronise (one step alone, nothing
overlapping the previous or next one). Also measured: pinned host <-> GPU copy bandwidth, the floor for a
paged step (its state crosses the link twice), and kbit's paged 8-bit optimizer with other staging set-ups and
with ``transfer="mapped"`` (no copies: the kernel works on the pinned host state in place).

    python3 bench/optim_step.py [--case lora|1b|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import torch

from kbit.optim import PagedAdamW8bit, build_optimizer
from kbit.optim.flat import blocks_of

MiB = 1 << 20


def lora_shapes(r: int = 16) -> list[tuple[int, int]]:
    """LoRA A [r, in] and B [out, r] of every linear of Llama-3-8B (hidden 4096, kv 1024, mlp 14336, 32
    layers)."""
    h, kv, mlp = 4096, 1024, 14336
    per_layer = [
        (h, h),
        (h, kv),
        (h, kv),
        (h, h),
        (h, mlp),
        (h, mlp),
        (mlp, h),
    ]  # (in, out): q k v o gate up down
    return [s for _ in range(32) for i, o in per_layer for s in ((r, i), (o, r))]


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """Every parameter of a Llama-3.2-1B-shaped model (hidden 2048, kv 512, mlp 8192, 16 layers, tied 128256
    vocab)."""
    h, kv, mlp, vocab = 2048, 512, 8192, 128256
    layer = [(h, h), (kv, h), (kv, h), (h, h), (mlp, h), (mlp, h), (h, mlp), (h,), (h,)]
    return [(vocab, h)] + [s for _ in range(16) for s in layer] + [(h,)]


def make_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, device="cuda", generator=gen).mul_(0.02).requires_grad_()
        p.grad = torch.randn(s, device="cuda", generator=gen).mul_(1e-3)
        params.append(p)
    return params


def optimizers() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    import bitsandbytes as bnb

    kw = dict(lr=1e-5, weight_decay=0.0)

    def paged(sets: int, chunks: int) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        def make(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
            blocks = -(-sum(blocks_of(p.numel()) for p in ps) // chunks)
            return PagedAdamW8bit(ps, chunk_blocks=blocks, staging_sets=sets, **kw)

        return make

    return {
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "bnb AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, **kw),
        "bnb PagedAdamW8bit": lambda ps: bnb.optim.PagedAdamW8bit(ps, **kw),
        "kbit adamw": lambda ps: build_optimizer("adamw", ps, **kw),
        "kbit adamw_8bit": lambda ps: build_optimizer("adamw_8bit", ps, **kw),
        "kbit paged_adamw_8bit": lambda ps: build_optimizer("paged_adamw_8bit", ps, **kw),
        "kbit paged_adamw": lambda ps: build_optimizer("paged_adamw", ps, **kw),
        # the default is 2 staging sets of 1/24 of the state; more, smaller chunks overlap more but cost the host more
        "kbit paged_adamw_8bit, 3 sets of 1/36": paged(3, 36),
        "kbit paged_adamw_8bit, 3 sets of 1/32": paged(3, 32),
        # no staging: the kernel reads and writes the pinned host state in place, one launch
        "kbit paged_adamw_8bit, mapped": lambda ps: PagedAdamW8bit(ps, transfer="mapped", **kw),
    }


def measure(make: Callable, params: list[torch.Tensor], warmup: int, steps: int) -> dict:
    """State held and peak (MiB), mean step time, host time per step and synced step time (ms) of one optimizer."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    opt = make(params)
    opt.step()  # state initialisation (and kernel compilation) happen here
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        h0 = time.perf_counter()
        opt.step()
        host += time.perf_counter() - h0  # until step() returns: the host's share, GPU work may still run
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
        torch.cuda.synchronize()
    synced = (time.perf_counter() - t0) / steps * 1e3
    # launches (chunks) per step of kbit's fused optimizers: each costs the host a launch (and, paged, copies)
    chunks = sum(len(b.layout.chunks) for b in getattr(opt, "_buckets", {}).values())
    del opt
    gc.collect()
    torch.cuda.empty_cache()
    return dict(
        ms=ms, held_mib=held / MiB, peak_mib=peak / MiB, host_ms=host / steps * 1e3, synced_ms=synced, chunks=chunks
    )


def link_bandwidth(nbytes: int = 256 * MiB) -> dict:
    """Pinned host -> GPU, GPU -> host and both at once (GB/s), 256 MiB copies."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn: Callable[[], None]) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5

    def both() -> None:
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)

    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host2.copy_(dev2, non_blocking=True))
    duplex = timed(both)
    return dict(h2d_gbs=nbytes / h2d / 1e9, d2h_gbs=nbytes / d2h / 1e9, duplex_each_gbs=nbytes / duplex / 1e9)


def run_case(name: str, shapes: list[tuple[int, ...]], warmup: int, steps: int, skip: set[str]) -> dict:
    params = make_params(shapes)
    n = sum(p.numel() for p in params)
    print(f"\n## {name}: {len(params)} tensors, {n / 1e6:.1f}M fp32 parameters, {warmup} warm-up + {steps} timed steps")
    print(
        "| optimizer | step ms | state held on GPU MiB | peak extra in step MiB | host ms | synced step ms |\n"
        "|---|---|---|---|---|---|",
        flush=True,
    )
    rows = {}
    for label, make in optimizers().items():
        if label in skip:
            continue
        if "Paged" in label and torch.cuda.mem_get_info()[0] < 4 * n:
            # bitsandbytes' paged states are managed memory: never ask for more than the GPU has free.
            print(f"| {label} | skipped: less free GPU memory than twice its managed state | | | | |", flush=True)
            continue
        try:
            r = measure(make, params, warmup, steps)
        except Exception as err:  # report and go on: one optimizer's failure must not lose the others' numbers
            print(f"| {label} | failed: {type(err).__name__}: {str(err)[:200]} | | | | |", flush=True)
            continue
        rows[label] = r
        print(
            f"| {label} | {r['ms']:.2f} | {r['held_mib']:.1f} | {r['peak_mib']:.1f} | {r['host_ms']:.2f}"
            f" | {r['synced_ms']:.2f} |",
            flush=True,
        )
    state8 = 2 * n + 8 * sum(-(-p.numel() // 256) for p in params)
    del params
    return dict(tensors=len(shapes), params=n, state8_mib=state8 / MiB, rows=rows)


def targets(case: dict, link: dict) -> None:
    r = case["rows"]
    need = ("bnb AdamW8bit", "kbit adamw_8bit", "kbit paged_adamw_8bit")
    if not all(k in r for k in need):
        return
    b8, k8, kp = (r[k] for k in need)
    floor_ms = case["state8_mib"] * MiB / (link["duplex_each_gbs"] * 1e9) * 1e3
    print(f"- kbit 8-bit / bnb 8-bit time: {k8['ms'] / b8['ms']:.3f} (target <= 0.25)")
    print(f"- kbit 8-bit / bnb 8-bit state held: {k8['held_mib'] / b8['held_mib']:.3f} (target: same size)")
    print(f"- kbit paged held / kbit 8-bit state: {kp['held_mib'] / k8['held_mib']:.3f} (target < 0.10)")
    print(f"- kbit paged / unpaged time: {kp['ms'] / k8['ms']:.2f}x (target < 1.15x)")
    print(
        f"- link floor for a paged step ({case['state8_mib']:.0f} MiB each way at"
        f" {link['duplex_each_gbs']:.1f} GB/s"
        f" duplex): {floor_ms:.2f} ms; kbit paged step {kp['ms']:.2f} ms",
        flush=True,
    )
    for label, x in r.items():
        if not label.startswith("kbit") or not x["chunks"]:
            continue
        bound = "host" if x["host_ms"] > 0.8 * x["ms"] else "GPU"
        line = f"- {label}: step() returns after {x['host_ms']:.2f} ms of a {x['ms']:.2f} ms step ({bound}-bound)"
        if x["chunks"] > 1:  # what each chunk adds to the unpaged step's host work
            per = (x["host_ms"] - k8["host_ms"]) / (x["chunks"] - 1) * 1e3
            line += f", {x['chunks']} chunks, {per:.0f} us of host work per extra chunk"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("lora", "1b", "all"), default="all")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    link = link_bandwidth()
    print(
        f"pinned link: H2D {link['h2d_gbs']:.1f} GB/s, D2H {link['d2h_gbs']:.1f} GB/s,"
        f" both at once {link['duplex_each_gbs']:.1f} GB/s each",
        flush=True,
    )
    out = dict(device=torch.cuda.get_device_name(), link=link)
    if args.case in ("lora", "all"):
        out["lora"] = run_case("Llama-3-8B LoRA r=16, all linears", lora_shapes(), 3, 20, set())
        targets(out["lora"], link)
    if args.case in ("1b", "all"):
        # The fp32 paged AdamW would pin 10 GB of host memory here; it and the staging variants are measured on
        # the LoRA case only.
        skip = {k for k in optimizers() if k == "kbit paged_adamw" or " sets of " in k}
        out["1b"] = run_case("Llama-3.2-1B full tuning", llama_1b_shapes(), 2, 5, skip)
        targets(out["1b"], link)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
