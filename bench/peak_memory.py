"""What is alive on the GPU at the peak of one training step, from an allocator snapshot.

    python3 bench/train_step.py --modes fast-memory --batches 1 --memory-snapshot step.pickle   # on the GPU
    python3 bench/peak_memory.py step.pickle                                                   # anywhere

The snapshot (``torch.cuda.memory._dump_snapshot``) holds every allocation and free of the recorded step with the
Python frames that made it. This replays them in order, finds the moment the step's own allocations peaked, and
prints the allocations alive then, grouped by the innermost frame in kbit or transformers (with the frame below it),
largest first. Allocations made before the recording started (weights, parameters, optimizer state) are counted
once, as the bytes still allocated at the end that the recording never saw being made.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from pathlib import Path

MIB = 2**20
OURS = ("/kbit/", "/transformers/", "/bench/")


def where(frames: list[dict], depth: int = 2) -> str:
    """The innermost ``depth`` frames in kbit, transformers or the bench: 'file:line fn <- file:line fn'."""
    mine = [f for f in frames if any(k in f["filename"] for k in OURS)]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in mine[:depth]) or "?"


def peak_of(snapshot: dict, device: int = 0, depth: int = 2) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(bytes allocated before the recording, the step's peak above them, [(where, bytes, count)] alive then)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in snapshot["device_traces"][device]:
        action = e["action"]
        if action == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", []), depth))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    traced = set(live)
    before = sum(
        b["size"]
        for seg in snapshot["segments"]
        if seg["device"] == device
        for b in seg["blocks"]
        if b["state"] == "active_allocated" and seg["address"] + b.get("offset", 0) not in traced
    )
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, w in at_peak.values():
        groups[w][0] += size
        groups[w][1] += 1
    rows = sorted(((w, b, n) for w, (b, n) in groups.items()), key=lambda r: -r[1])
    return before, peak, rows


def main(argv: list[str] | None = None) -> None:
    """Print the peak's composition."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--depth", type=int, default=2, help="frames of kbit/transformers per group")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    with args.snapshot.open("rb") as f:
        snap = pickle.load(f)
    before, peak, rows = peak_of(snap, depth=args.depth)
    print(f"allocated before the step (weights, parameters, optimizer state, ...): ~{before / MIB:,.0f} MiB")
    print(f"the step's peak above that: {peak / MIB:,.0f} MiB; alive then:")
    print("| MiB | tensors | made at |\n|---|---|---|")
    for w, b, n in rows[: args.top]:
        print(f"| {b / MIB:,.1f} | {n} | {w} |")
    rest = sum(b for _, b, _ in rows[args.top :])
    if rest:
        print(f"| {rest / MIB:,.1f} | | (the rest) |")


if __name__ == "__main__":
    main()
