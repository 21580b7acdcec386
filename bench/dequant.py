"""Benchmark: kbit's Triton NF4 dequantization vs bitsandbytes' CUDA kernels and the copy bandwidth.

Dequantization moves bytes and does almost no arithmetic, so the yardstick is a large device-to-device copy
measured in the same run (bytes read + written per second). Each kernel is timed two ways:

- graph: ``CALLS`` back-to-back calls captured in one CUDA graph and replayed; inputs rotate over enough
  copies that they do not stay in L2, and every call writes a fresh output buffer. Median replay time /
  CALLS.
- do_bench: ``triton.testing.do_bench`` (L2 flushed before each call), median.

Bytes counted: packed weights + block statistics (fp32 absmax, or uint8 codes + nested absmax + nested map +
offset under double quant) + the 16-entry table read, and the bf16 output written. "into strided rows" times the
same dequantization written into the first columns of a buffer 64 columns wider (kbit.lora.grouped's weights).

Usage (CUDA machine, bitsandbytes with CUDA on PYTHONPATH): python bench/dequant.py [--sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import triton

import kbit.quant as kq
from kbit.kernels.triton import quant4

SHAPES = [(14336, 4096), (4096, 4096)]
L2_ROTATE_BYTES = 256 * 2**20  # inputs of one rotation span well over the 50 MB L2
CALLS = 16  # calls per captured graph
# (int32 words per program, warps, table lookup by tl.gather) tried with --sweep
CONFIGS = [(w, warps, g) for g in (True, False) for w, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8))]


def time_graph(fn, inputs: list, reps: int = 30) -> float:
    """Median µs per call of ``fn(inputs[i % len])`` over CALLS calls replayed from one CUDA graph."""
    for i in range(max(3, len(inputs))):  # compile, and build any per-input cache, outside the capture
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    outs = []  # kept alive so every captured call writes its own buffer
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            outs.append(fn(inputs[i % len(inputs)]))
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph, outs
    return statistics.median(times)


def time_do_bench(fn, inputs: list) -> float:
    """Median µs of ``fn`` over rotated inputs by triton.testing.do_bench (it flushes L2 before each call)."""
    it = iter(range(10**9))
    return (
        triton.testing.do_bench(lambda: fn(inputs[next(it) % len(inputs)]), warmup=50, rep=300, return_mode="median")
        * 1e3
    )


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of 30)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    assert torch.equal(dst[:4096], src[:4096])
    return 2 * nbytes / statistics.median(times)


def host_us(fn, reps: int = 2000) -> float:
    """Host time per call in µs on a tiny weight, where the GPU is never the bottleneck: launch overhead."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def host_overhead(F, nested: bool) -> dict:
    """Per-call host cost of kbit's public dequantize, its Triton wrapper alone, and bitsandbytes'."""
    w = torch.randn(256, 256, device="cuda").to(torch.bfloat16)
    packed, state = kq.quantize_4bit(w, "nf4", 64, compress_statistics=nested)
    b_packed, b_state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    raw = kq.as_bytes(packed)
    return {
        "double_quant": nested,
        "kbit_public_us": host_us(lambda: kq.dequantize_4bit(packed, state, torch.bfloat16)),
        "kbit_kernel_wrapper_us": host_us(lambda: quant4.dequantize_4bit(raw, state, torch.bfloat16)),
        "bnb_us": host_us(lambda: F.dequantize_4bit(b_packed, b_state)),
    }


def dequant_bytes(n: int, blocksize: int, nested: bool) -> int:
    """Bytes one dequantization must move: packed + statistics + table read, bf16 output written."""
    nb = -(-n // blocksize)
    stats = nb + 4 * -(-nb // 256) + 256 * 4 + 4 if nested else 4 * nb
    return (n + 1) // 2 + stats + 16 * 4 + 2 * n


def bench_case(F, shape: tuple[int, int], nested: bool, sweep: bool, copy_bw: float) -> dict:
    """Time kbit and bitsandbytes NF4 dequantization (bf16 out) of one weight shape."""
    n = shape[0] * shape[1]
    footprint = n // 2 + 4 * n // 64
    sets = max(2, -(-L2_ROTATE_BYTES // footprint))
    kb_inputs, bnb_inputs = [], []
    for s in range(sets):
        w = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(s)).mul_(0.02)
        w = w.to(torch.bfloat16)
        kb_inputs.append(kq.quantize_4bit(w, "nf4", 64, compress_statistics=nested))
        bnb_inputs.append(F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4"))
    # sanity: same weights, same format: values may differ only where the codes do (bnb CUDA's rounding)
    ours = kq.dequantize_4bit(*kb_inputs[0], torch.bfloat16)
    theirs = F.dequantize_4bit(*bnb_inputs[0])
    differ = (ours != theirs).float().mean().item()

    def kbit_call(inp):
        return kq.dequantize_4bit(inp[0], inp[1], torch.bfloat16)

    def bnb_call(inp):
        return F.dequantize_4bit(inp[0], inp[1])

    def strided_call(inp):  # into the first columns of a buffer 64 wider (kbit.lora.grouped's widened weight)
        out = torch.empty(shape[0], shape[1] + 64, dtype=torch.bfloat16, device="cuda")
        return kq.dequantize_4bit(inp[0], inp[1], out=out[:, : shape[1]])

    nbytes = dequant_bytes(n, 64, nested)
    row = {
        "shape": list(shape),
        "double_quant": nested,
        "bytes": nbytes,
        "rotated_sets": sets,
        "values_differing_from_bnb": differ,
    }
    assert torch.equal(strided_call(kb_inputs[0]), ours), "strided rows changed the values"
    cases = (("kbit", kbit_call, kb_inputs), ("kbit_strided", strided_call, kb_inputs), ("bnb", bnb_call, bnb_inputs))
    for name, fn, inputs in cases:
        try:
            row[f"{name}_graph_us"] = time_graph(fn, inputs)
        except Exception as e:  # noqa: BLE001 - a library that cannot be captured is timed by do_bench alone
            row[f"{name}_graph_error"] = repr(e)[:200]
        row[f"{name}_do_bench_us"] = time_do_bench(fn, inputs)
    if sweep:
        row["sweep"] = {}
        reference = kbit_call(kb_inputs[0])
        for words, warps, gather in CONFIGS:

            def cfg_call(inp, words=words, warps=warps, gather=gather):
                raw = kq.as_bytes(inp[0])
                return quant4.dequantize_4bit(raw, inp[1], torch.bfloat16, words, warps, gather)

            name = f"{words}/{warps}/{'gather' if gather else 'load'}"
            assert torch.equal(cfg_call(kb_inputs[0]), reference), f"configuration {name} changed the values"
            row["sweep"][name] = time_graph(cfg_call, kb_inputs)
    # quantization (nice to have): kernel wrappers only, bf16 input, do_bench
    if not nested:
        ws = [torch.randn(shape, device="cuda").mul_(0.02).to(torch.bfloat16) for _ in range(max(2, sets // 4))]
        row["kbit_quant_us"] = time_do_bench(lambda w: quant4.quantize_4bit(w, "nf4", 64), ws)
        row["bnb_quant_us"] = time_do_bench(lambda w: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), ws)
        row["quant_bytes"] = 2 * n + n // 2 + 4 * (n // 64)
    best = row.get("kbit_graph_us", row["kbit_do_bench_us"])
    row["kbit_tbs"] = nbytes / (best * 1e-6) / 1e12
    row["kbit_copy_frac"] = nbytes / (best * 1e-6) / copy_bw
    return row


def markdown(rows: list[dict], copy_bw: float) -> str:
    """The results as a markdown table (graph timings; do_bench in its own columns)."""
    lines = [
        f"copy bandwidth (read + write, 1 GiB copy): {copy_bw / 1e12:.2f} TB/s",
        "",
        "| weight | DQ | MB moved | kbit µs | kbit TB/s | kbit % of copy | bnb µs | bnb TB/s | bnb % of copy "
        "| bnb/kbit time | kbit do_bench µs | bnb do_bench µs | kbit into strided rows µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r.get("kbit_graph_us", float("nan"))
        b = r.get("bnb_graph_us", float("nan"))
        tk, tbb = r["bytes"] / (k * 1e-6), r["bytes"] / (b * 1e-6)  # bytes/s
        dq = "yes" if r["double_quant"] else "no"
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {dq} | {r['bytes'] / 1e6:.1f} "
            f"| {k:.1f} | {tk / 1e12:.2f} | {100 * tk / copy_bw:.0f}% | {b:.1f} | {tbb / 1e12:.2f} "
            f"| {100 * tbb / copy_bw:.0f}% | {b / k:.2f}x | {r['kbit_do_bench_us']:.1f} "
            f"| {r['bnb_do_bench_us']:.1f} | {r.get('kbit_strided_graph_us', float('nan')):.1f} |"
        )
    quant = [r for r in rows if "kbit_quant_us" in r]
    if quant:
        lines += [
            "",
            "| weight (bf16 in) | kbit quantize µs | kbit TB/s | bnb quantize µs | bnb/kbit time |",
            "|---|---|---|---|---|",
        ]
        for r in quant:
            k, b = r["kbit_quant_us"], r["bnb_quant_us"]
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {k:.1f} | {r['quant_bytes'] / (k * 1e-6) / 1e12:.2f} "
                f"| {b:.1f} | {b / k:.2f}x |"
            )
    sweeps = [r for r in rows if "sweep" in r]
    if sweeps:
        cfgs = list(sweeps[0]["sweep"])
        lines += [
            "",
            "kbit configurations, words per program / warps / table lookup (graph µs):",
            "",
            "| weight | DQ | " + " | ".join(cfgs) + " |",
            "|---|---|" + "---|" * len(cfgs),
        ]
        for r in sweeps:
            cells = " | ".join(f"{r['sweep'][c]:.1f}" for c in cfgs)
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {'yes' if r['double_quant'] else 'no'} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time each kbit tiling configuration")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args()
    import bitsandbytes
    import bitsandbytes.functional as F

    props = torch.cuda.get_device_properties(0)
    env = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kbit_default": f"{quant4.DEQUANT_WORDS}/{quant4.DEQUANT_WARPS}/{quant4.DEQUANT_GATHER}",
    }
    print(json.dumps(env), flush=True)
    copy_bw = copy_bandwidth()
    rows = []
    for shape in SHAPES:
        for nested in (False, True):
            rows.append(bench_case(F, shape, nested, args.sweep, copy_bw))
            print(json.dumps(rows[-1]), flush=True)
    copy_bw_after = copy_bandwidth()  # a second reading shows drift over the run
    host = [host_overhead(F, nested) for nested in (False, True)]
    table = markdown(rows, copy_bw)
    table += f"\n\ncopy bandwidth re-measured after the run: {copy_bw_after / 1e12:.2f} TB/s\n\n"
    table += "host time per call, 256x256 NF4 weight (µs): | DQ | kbit public API | kbit wrapper | bnb |\n"
    table += "|---|---|---|---|\n"
    for h in host:
        table += (
            f"| {'yes' if h['double_quant'] else 'no'} | {h['kbit_public_us']:.1f} "
            f"| {h['kbit_kernel_wrapper_us']:.1f} | {h['bnb_us']:.1f} |\n"
        )
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps({"env": env, "copy_bw": copy_bw, "rows": rows, "host": host}, indent=1)
        )
        (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
