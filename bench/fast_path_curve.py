"""Does the fast path keep the loss curve? The default job's model and data trained three ways, step for step.

    python bench/fast_path_curve.py                          # 200 steps on CUDA (the issue's check), ~3 min on an H100
    python bench/fast_path_curve.py --steps 4 --device cpu   # smoke test
    python bench/fast_path_curve.py --adapters compute --plot bench/fast_path_curve_fused_lora.png

Runs, all from the same seed (data order, LoRA initialisation, dropout), SmolLM2-135M-Instruct in NF4 + DQ, LoRA
r=16 on every linear layer, the built-in date-to-ISO task, batch 8, lr 1e-3 (the default job's settings), ``--steps``
optimizer steps:

- ``reference fp32``: kbit's unfused modules, no autocast (float32 compute): the yardstick;
- ``reference bf16``: the same modules under bf16 autocast: how far bf16 alone moves the curve ("bf16 noise");
- ``fast path bf16``: the fused RMSNorm / SwiGLU / RoPE kernels, the chunked LM-head cross-entropy and the speed
  memory plan, under bf16 autocast.

The fast path keeps the curve when its distance to ``reference bf16`` is no larger than bf16's own distance to
fp32 (per-step train loss, max and mean over the steps). Writes the curves and their differences as a PNG.

``--adapters compute`` trains every run with its LoRA weights in the run's compute dtype (bf16 under autocast) and
LoRA dropout 0, the conditions under which the fast path also runs each adapter inside its base projection's GEMMs
(kbit.lora.fused, kbit.lora.grouped); the default (float32 adapters, the default job's dropout) leaves them unfused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kbit.data import tokenize_records
from kbit.lora import add_lora
from kbit.models import load_model, load_tokenizer
from kbit.train import TrainConfig, Trainer
from kbit.train.default_job import DEFAULT_JOB
from kbit.train.job import prepare_records, resolve_device

RUNS = {  # name -> TrainConfig overrides
    "reference fp32": {"fast_path": False, "bf16": False, "memory_plan": "none"},
    "reference bf16": {"fast_path": False, "bf16": True, "memory_plan": "none"},
    "fast path bf16": {"fast_path": True, "bf16": True, "memory_plan": "speed"},
}


def run_one(name: str, overrides: dict, base: dict, out: Path, adapters: str = "float32") -> dict:
    """Train one configuration; returns its per-step train losses (adapters: 'float32' or 'compute' dtype)."""
    config = TrainConfig(**(base | overrides | {"output_dir": str(out / name.replace(" ", "_"))}))
    device = resolve_device(config.device)
    if device.type == "cpu":  # the smoke test: kbit trains in float32 on a CPU
        config.bf16 = False
    tokenizer = load_tokenizer(config.model)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = load_model(config.model, bits=4, quant_type="nf4", double_quant=True, compute_dtype=dtype, device=device)
    torch.manual_seed(config.seed)  # the LoRA initialisation, as kbit train seeds it
    add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
             target_modules=config.target_modules, dtype=torch.float32 if adapters == "float32" else dtype)  # fmt: skip
    train_records, _ = prepare_records(config)
    train = tokenize_records(train_records, tokenizer, config.max_seq_len)
    trainer = Trainer(model, tokenizer, train.examples, None, config)
    t = time.perf_counter()
    result = trainer.train()
    return {"name": name, "losses": result.losses, "seconds": round(time.perf_counter() - t, 1)}


def distances(a: list[float], b: list[float]) -> tuple[float, float]:
    """(max, mean) absolute per-step difference of two loss curves."""
    d = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return max(d), sum(d) / len(d)


def plot(results: dict[str, list[float]], path: Path) -> None:
    """The three curves (top) and the two distances that matter (bottom), one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, losses in results.items():
        top.plot(range(1, len(losses) + 1), losses, linewidth=1.2, label=name)
    top.set_yscale("log")
    top.set_ylabel("train loss (log)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    ref, fast, fp32 = results["reference bf16"], results["fast path bf16"], results["reference fp32"]
    steps = range(1, len(ref) + 1)
    fast_gap = [abs(a - b) for a, b in zip(fast, ref, strict=True)]
    bottom.plot(steps, fast_gap, linewidth=1, label="|fast - reference bf16|")
    bottom.plot(steps, [abs(a - b) for a, b in zip(ref, fp32, strict=True)], linewidth=1,
                label="|reference bf16 - reference fp32| (bf16 noise)")  # fmt: skip
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("|loss difference|")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main() -> None:
    """Train the three runs, print the distances and write the chart."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/fast_path_curve")
    ap.add_argument("--plot", default="bench/fast_path_curve.png")
    ap.add_argument(
        "--adapters",
        default="float32",
        choices=("float32", "compute"),
        help="compute: LoRA weights in each run's compute dtype and dropout 0 (the fused LoRA nodes run)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = DEFAULT_JOB["per_device_train_batch_size"]
    base = DEFAULT_JOB | {"max_train_samples": args.steps * batch, "max_steps": args.steps, "eval_steps": 0,
                          "save_steps": 0, "report_to": "none", "eval_accuracy_samples": 0,
                          "device": args.device}  # fmt: skip
    if args.adapters == "compute":
        base["lora_dropout"] = 0.0
    results = {}
    for name, overrides in RUNS.items():
        print(f"=== {name}", flush=True)
        r = run_one(name, overrides, base, out, args.adapters)
        results[name] = r["losses"]
        print(json.dumps({"run": name, "seconds": r["seconds"], "last_loss": r["losses"][-1]}), flush=True)
    (out / "losses.json").write_text(json.dumps(results) + "\n")
    fast_max, fast_mean = distances(results["fast path bf16"], results["reference bf16"])
    noise_max, noise_mean = distances(results["reference bf16"], results["reference fp32"])
    verdict = "kept" if fast_max <= noise_max and fast_mean <= noise_mean else "NOT within bf16 noise"
    print(f"\n|fast - reference bf16|: max {fast_max:.4g}, mean {fast_mean:.4g}")
    print(f"|reference bf16 - fp32| (bf16 noise): max {noise_max:.4g}, mean {noise_mean:.4g}")
    print(f"loss curve {verdict} over {args.steps} steps")
    plot(results, Path(args.plot))
    print(f"wrote {args.plot} and {out / 'losses.json'}")


if __name__ == "__main__":
    main()
