"""Fine-tuning with the same data, seed, steps and LoRA in 16-bit LoRA, NF4+DQ QLoRA, FP4+DQ QLoRA, int8 LoRA and
LoftQ-initialised NF4+DQ QLoRA: eval-loss curves, final eval loss and task accuracy of each.

    python bench/quality_finetune.py                       # the default job's settings, 5 runs (~25 min, 2-core CPU)
    python bench/quality_finetune.py --quick               # kbit train --quick sized (15 steps), CI-sized
    python bench/quality_finetune.py --plot-only           # redraw the chart from <out>/results.json
    python bench/quality_finetune.py --runs "int8 LoRA"    # (re)run one; the others in results.json are kept

Every run is the embedded default job (``kbit.train.default_job.DEFAULT_JOB``: SmolLM2-135M-Instruct, LoRA r=16,
alpha 32, dropout 0.05 on every linear layer, 320 examples of the built-in date-to-ISO task, 40 steps of 8, lr 1e-3,
cosine with 10% warmup, seed 42, 64 held-out examples for the eval loss, 50 held-out prompts answered greedily for
the exact-match accuracy), built from the same pieces as ``kbit train`` (``load_model``, ``add_lora``,
``kbit.train.job.prepare_records``, ``tokenize_records``, ``Trainer``, ``task_accuracy``); only the base differs:

- 16-bit: ``load_model(bits=16)``, no quantization (float32 on a CPU, where the trainer computes in float32);
- NF4 + DQ / FP4 + DQ (blocksize 64) / int8 (row-wise): ``load_model(bits=4|8, ...)``, LoRA B = 0 (plain QLoRA);
- LoftQ: ``load_model(bits=16)``, ``add_lora`` (same seed), then ``kbit.lora.loftq.loftq_quantize`` (NF4 + DQ,
  blocksize 64, 5 iterations): the base becomes an ordinary Linear4bit and A, B start from the residual's SVD.

The eval loss is measured every ``--eval-steps`` steps for the chart (evaluation does not touch the training RNG).
Results go to ``<out>/results.json`` (one entry per run, written as each finishes; runs already there are kept unless
run again) and the chart to ``--plot``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kbit.data import tokenize_records  # noqa: E402
from kbit.lora import add_lora  # noqa: E402
from kbit.lora.loftq import loftq_quantize  # noqa: E402
from kbit.models import load_model, load_tokenizer  # noqa: E402
from kbit.train import TrainConfig, Trainer  # noqa: E402
from kbit.train.default_job import DEFAULT_JOB, QUICK, task_accuracy  # noqa: E402
from kbit.train.job import prepare_records, resolve_device  # noqa: E402
from kbit.train.loop import resolve_bf16  # noqa: E402

# name -> (TrainConfig overrides, LoftQ?)
RUNS: dict[str, tuple[dict, bool]] = {
    "16-bit LoRA": ({"bits": 16}, False),
    "NF4 + DQ QLoRA": ({"bits": 4, "quant_type": "nf4", "double_quant": True}, False),
    "FP4 + DQ QLoRA": ({"bits": 4, "quant_type": "fp4", "double_quant": True}, False),
    "int8 LoRA": ({"bits": 8}, False),
    "LoftQ NF4 + DQ QLoRA": ({"bits": 4, "quant_type": "nf4", "double_quant": True}, True),
}


def build_model(config: TrainConfig, loftq: bool, device: torch.device, dtype: torch.dtype, loftq_iters: int = 5):
    """The base model with LoRA, as ``kbit train`` builds it; LoftQ: a 16-bit load quantized by ``loftq_quantize``."""
    bits = 16 if loftq else config.bits
    model = load_model(config.model, bits=bits, quant_type=config.quant_type, double_quant=config.double_quant,
                       compute_dtype=dtype, device=device)  # fmt: skip
    torch.manual_seed(config.seed)  # the LoRA initialisation, as kbit train seeds it
    add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
             target_modules=config.target_modules, dtype=torch.float32)  # fmt: skip
    info = {}
    if loftq:
        t = time.perf_counter()
        errors = loftq_quantize(model, config.quant_type, 64, config.double_quant, loftq_iters, compute_dtype=dtype)
        info = {
            "loftq_seconds": round(time.perf_counter() - t, 1),
            "weight_error_nf4": sum(e for e, _ in errors.values()) / len(errors),
            "weight_error_loftq": sum(e for _, e in errors.values()) / len(errors),
        }
    return model, info


def run_one(name: str, overrides: dict, loftq: bool, base: dict, out: Path) -> dict:
    """Train one configuration; returns its eval-loss curve, final eval loss and accuracy."""
    config = TrainConfig(**(base | overrides | {"output_dir": str(out / name.replace(" ", "_").replace("+", ""))}))
    device = resolve_device(config.device)
    dtype = torch.bfloat16 if resolve_bf16(config, device) else torch.float32
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    model, info = build_model(config, loftq, device, dtype)
    train_records, eval_records = prepare_records(config)
    train = tokenize_records(train_records, tokenizer, config.max_seq_len)
    evaluation = tokenize_records(eval_records, tokenizer, config.max_seq_len)
    trainer = Trainer(model, tokenizer, train.examples, evaluation, config)
    t_train = time.perf_counter()
    result = trainer.train()
    t_trained = time.perf_counter()
    acc = task_accuracy(model, tokenizer, eval_records.rows[: config.eval_accuracy_samples],
                        config.generation_max_new_tokens)  # fmt: skip
    steps, losses = trainer.metrics.series("eval_loss")
    return {
        "name": name,
        "config": dataclasses.asdict(config),
        "loftq": loftq,
        "eval_steps": steps,
        "eval_loss": losses,
        "final_eval_loss": result.eval_loss,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "accuracy": acc["accuracy"],
        "correct": acc["correct"],
        "n": acc["n"],
        "sample": acc["sample"],
        "seconds_train": round(t_trained - t_train, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "compute_dtype": str(dtype).removeprefix("torch."),
        **info,
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    """One PNG with every run's eval-loss curve (log scale: the runs differ most at the end, where losses are small)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        ax.plot(r["eval_steps"], r["eval_loss"], marker="o", markersize=3, linewidth=1.4,
                label=f"{r['name']}: {r['final_eval_loss']:.4f}, {r['correct']}/{r['n']}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (mean CE per target token, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="run: final eval loss, exact match", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def report(results: list[dict]) -> None:
    """Print the markdown table and the targets."""
    by = {r["name"]: r for r in results}
    ref = by.get("16-bit LoRA")
    print("\n| run | eval loss before | final eval loss | vs 16-bit | exact match | train s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rel = f"{r['final_eval_loss'] / ref['final_eval_loss'] - 1:+.1%}" if ref else "-"
        print(f"| {r['name']} | {r['eval_loss'][0]:.4f} | {r['final_eval_loss']:.4f} | {rel} | "
              f"{r['correct']}/{r['n']} | {r['seconds_train']:.0f} |")  # fmt: skip
    nf4, loftq = by.get("NF4 + DQ QLoRA"), by.get("LoftQ NF4 + DQ QLoRA")
    if ref and nf4:
        gap = nf4["final_eval_loss"] / ref["final_eval_loss"] - 1
        met = "met" if abs(gap) <= 0.01 else f"MISSED by {abs(gap) - 0.01:.1%} points"
        print(f"\n- NF4+DQ final eval loss {gap:+.2%} vs 16-bit (target within 1%): {met}")
    if nf4 and loftq:
        met = "met" if loftq["final_eval_loss"] < nf4["final_eval_loss"] else "MISSED"
        print(f"- LoftQ final eval loss {loftq['final_eval_loss']:.4f} < NF4+DQ {nf4['final_eval_loss']:.4f}: {met}")


def main() -> None:
    """Train the configurations in turn, then print the table and write the chart."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="kbit train --quick sizes (15 steps, 24 eval examples)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    ap.add_argument("--seed", type=int, default=None, help="override the job's seed (42): data order, LoRA init")
    ap.add_argument("--eval-steps", type=int, default=5, help="eval-loss points every this many steps (default 5)")
    ap.add_argument("--out", default="runs/quality_finetune", help="run folders and results.json go here")
    ap.add_argument("--plot", default="docs/quality_finetune.png", help="the chart (PNG)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the chart and table from <out>/results.json")
    args = ap.parse_args()
    out = Path(args.out)
    results_path = out / "results.json"
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown run {unknown}; choose from {', '.join(RUNS)}")
    base = DEFAULT_JOB | (QUICK if args.quick else {})
    base = base | {"eval_steps": args.eval_steps, "save_steps": 0, "report_to": "none", "eval_on_start": True}
    if args.seed is not None:
        base["seed"] = args.seed

    # Earlier runs in results.json are kept (a run of the same name is replaced), so runs can be added one at a time.
    results: list[dict] = json.loads(results_path.read_text()) if results_path.is_file() else []
    order = list(RUNS)
    if not args.plot_only:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            overrides, loftq = RUNS[name]
            print(f"=== {name}", flush=True)
            results = [r for r in results if r["name"] != name] + [run_one(name, overrides, loftq, base, out)]
            results.sort(key=lambda r: order.index(r["name"]))  # table order, whatever order they ran in
            results_path.write_text(json.dumps(results, indent=1) + "\n")
    if not results:
        raise SystemExit(f"--plot-only: {results_path} holds no results; run the benchmark first")
    cfg = results[0]["config"]
    title = (f"SmolLM2-135M-Instruct, built-in date-to-ISO task: {cfg['max_train_samples']} examples, "
             f"batch {cfg['per_device_train_batch_size']},\nlr {cfg['learning_rate']:g}, LoRA r={cfg['lora_r']}, "
             f"seed {cfg['seed']}; {platform.machine()} CPU, {results[0]['compute_dtype']} compute")  # fmt: skip
    plot(results, Path(args.plot), title)
    report(results)
    print(f"\nwrote {args.plot} and {results_path}")


if __name__ == "__main__":
    main()
