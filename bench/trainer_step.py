"""``kbit train``'s own loop (kbit.train.Trainer) at one sequence of 2048, eager against ``cuda_graph: true``.

    python3 bench/trainer_step.py                                  # Llama-3-8B shape, plans speed and memory
    python3 bench/trainer_step.py --plans memory --optim paged_adamw_8bit
    python3 bench/trainer_step.py --device cpu --preset tiny --seq-len 64 --steps 3   # smoke test (eager only)

bench/train_step.py times the step as a bare function; this runs the trainer itself (data order, micro-batches,
loss normalisation, clipping, optimizer, scheduler, progress, metrics) on bench/train_step.py's random NF4 model
with bf16 LoRA r=16 on all seven projections (dropout 0), random token sequences of ``--seq-len`` with a target on
every position, one per step, and reads tokens/s from the metrics the trainer logs for each step (the median over the
steps after ``--warmup``; with graphs, the first two steps of a shape are its eager run and its capture). Peak memory
is torch.cuda.max_memory_allocated over the whole run (a graph's memory is allocated while it is captured; its
replays allocate nothing the counter sees).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import GIB, build  # noqa: E402

from kbit.data import Example  # noqa: E402


def run(preset: str, plan: str, graphs: bool, optim: str, seq_len: int, steps: int, warmup: int, device: str) -> dict:
    """One trainer run; its row."""
    from kbit.train import Trainer

    model, config = build(preset, None, device)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(steps):
        ids = torch.randint(1, config.vocab_size, (seq_len,), generator=gen).tolist()
        examples.append(Example(ids, list(ids)))
    with tempfile.TemporaryDirectory() as out:
        cfg = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-4,
                   warmup_steps=0, logging_steps=1, save_steps=0, eval_on_start=False, report_to="none",
                   lora_dropout=0.0, memory_plan=plan, cuda_graph=graphs, optim=optim, max_seq_len=seq_len,
                   device=device)  # fmt: skip
        trainer = Trainer(model, None, examples, None, cfg)
        if device == "cuda":  # the peak over the whole run: a graph allocates its memory when it is captured
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r.get("step", 0) > warmup]
    row = {"plan": plan, "cuda_graph": graphs, "optim": optim, "tokens_per_s": statistics.median(rates)}
    if device == "cuda":
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Eager and graphed trainer runs per plan; prints a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--plans", nargs="+", default=["speed", "memory"])
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rows = []
    for plan in args.plans:
        for graphs in (False, True) if args.device == "cuda" else (False,):
            row = run(args.preset, plan, graphs, args.optim, args.seq_len, args.steps, args.warmup, args.device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nkbit.train.Trainer, {args.preset}, 1 x {args.seq_len}, {args.optim}, on {name}")
    print("| memory plan | cuda_graph | tokens/s | peak alloc GiB |\n|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_alloc_gib']:.2f}" if r.get("peak_alloc_gib") else ""
        print(f"| {r['plan']} | {str(r['cuda_graph']).lower()} | {r['tokens_per_s']:,.0f} | {peak} |")
    return rows


if __name__ == "__main__":
    main()
