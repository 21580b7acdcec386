"""A whole ``kbit train`` run from a TrainConfig: load, quantize, add LoRA, prepare data, train, report, save.

Data flows one way (load -> quantize -> adapt -> train -> save); the Trainer only sees the adapted model and
tokenized examples. Eval loss and, when asked (``eval_accuracy_samples``), task accuracy and a sample answer
are measured before and after training and written to ``summary.json`` beside the adapter.

Under torchrun every rank runs this whole function: it opens the process group, streams its own copy of the
4-bit model from the safetensors files onto its own device (packed in the compute dtype, so that FSDP can
shard it), and the Trainer shards or wraps it; rank 0 alone prints and writes shared files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..dist import DistContext, close_distributed, init_distributed, launched_by_torchrun, match_quant_storage
from ..dist.checkpoint import save_adapter_gathered
from ..dist.hostmem import peak_rss_gib, reset_peak_rss, rss_gib
from ..dist.loading import expected_model_bytes, load_sharded, loads_sharded, sharded_load_line
from ..lora.inject import LoraSettings
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .loop import Trainer, default_output_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but torch sees no CUDA GPU; use device=cpu")
    return device


def resolve_output_dir(config: TrainConfig, job: str) -> Path:
    """The run folder; ``resume`` without output_dir or run_name picks the newest run under runs/ that has a
    complete checkpoint (a checkpoint path: its parent)."""
    if config.output_dir is None and config.run_name is None and config.resume is not False:
        if isinstance(config.resume, str):
            return Path(config.resume).expanduser().resolve().parent
        runs = [p for p in Path("runs").glob("*") if ckpt.latest_checkpoint(p) is not None]
        if not runs:
            raise ConfigError("resume: no run under runs/ has a complete checkpoint; give output_dir or run_name")
        return max(runs, key=lambda p: ckpt.latest_checkpoint(p).stat().st_mtime)
    return default_output_dir(config, job)


def prepare_records(config: TrainConfig) -> tuple[Any, Any]:
    """(train records, eval records or None) as kbit.data Records."""
    from ..data import builtin_dataset, load_dataset, split_records

    def read(source: str, split: str, limit: int | None):
        if source == "builtin":
            return load_dataset(builtin_dataset(split, n=limit))
        records = load_dataset(source, config.format)
        return records.subset(list(range(min(limit, len(records))))) if limit else records

    train = read(config.data, "train", config.max_train_samples)
    eval_source = config.eval_data or ("builtin" if config.data == "builtin" else None)
    if eval_source is not None:
        evaluation = read(eval_source, "eval", config.max_eval_samples)
    elif config.eval_fraction:
        train, evaluation = split_records(train, config.eval_fraction, config.seed)
        if config.max_eval_samples:
            evaluation = evaluation.subset(list(range(min(config.max_eval_samples, len(evaluation)))))
    else:
        evaluation = None
    return train, evaluation


def run_job(config: TrainConfig, job: str = "run") -> dict[str, Any]:
    """Run ``config`` end to end and return the summary (also written to ``<output_dir>/summary.json``).

    Under torchrun it opens the process group first (and closes it at the end); every rank must call it.
    """
    opened = launched_by_torchrun()
    if opened:
        try:
            ctx = init_distributed(config.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        ctx = DistContext(device=resolve_device(config.device))
    try:
        return _run(config, job, ctx)
    finally:
        if opened:
            close_distributed()


def _run(config: TrainConfig, job: str, ctx: DistContext) -> dict[str, Any]:
    from ..data import pack_examples, tokenize_records
    from ..lora import add_lora, trainable_parameters
    from ..models.load import load_model, load_tokenizer
    from .default_job import task_accuracy
    from .loop import resolve_bf16

    t_start = time.perf_counter()
    # Every rank must write to the same folder: rank 0's choice (a default name holds the time).
    output_dir = Path(ctx.broadcast_object(str(resolve_output_dir(config, job))))
    config = dataclasses.replace(config, output_dir=str(output_dir))
    device = ctx.device
    bf16 = resolve_bf16(config, device)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    say = print if ctx.is_main else _quiet
    shardable = ctx.distributed or config.strategy == "fsdp"  # FSDP gathers one dtype: pack 4-bit weights in it
    where = f"{ctx.world_size} processes on {device.type}" if ctx.distributed else str(device)
    say(
        f"kbit train ({job}): {config.model} in {config.bits}-bit"
        f"{' ' + config.quant_type.upper() if config.bits == 4 else ''}"
        f"{' + double quant' if config.bits == 4 and config.double_quant else ''}, LoRA r={config.lora_r} on "
        f"{config.target_modules}, data {config.data}, {where}; output {output_dir}",
        flush=True,
    )

    from transformers.utils import logging as hf_logging

    reset_peak_rss()
    rss_before = rss_gib()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the GGUF reader's per-tensor bar is noise in a training log
    try:
        tokenizer = load_tokenizer(config.model)
        loftq = config.lora_init == "loftq"
        # FSDP: each decoder layer gets its LoRA and is sharded as soon as it is loaded (no rank holds the model)
        sized = shardable and (config.strategy == "auto" or config.cpu_offload)  # auto and the offload check
        expected = expected_model_bytes(config.model, config.bits, config.double_quant) if sized else None
        streamed = shardable and not loftq and loads_sharded(config.strategy, ctx, expected, config.cpu_offload)
        if streamed:
            torch.manual_seed(config.seed)  # the LoRA initialisation, drawn layer by layer as add_lora would
            lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                target_modules=_targets(config.target_modules))  # fmt: skip
            model, load_memory = load_sharded(config.model, ctx, lora, cpu_offload=config.cpu_offload,
                                              bits=config.bits, quant_type=config.quant_type,
                                              double_quant=config.double_quant, compute_dtype=compute_dtype,
                                              expected_bytes=expected)  # fmt: skip
        else:
            model = load_model(
                config.model,
                bits=16 if loftq else config.bits,  # LoftQ quantizes the 16-bit weights itself, after add_lora
                quant_type=config.quant_type,
                double_quant=config.double_quant,
                compute_dtype=compute_dtype,
                quant_storage=compute_dtype if shardable else torch.uint8,
                device=device,
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if shardable:
        match_quant_storage(model, compute_dtype)  # pre-quantized checkpoints keep their storage: re-view it
    if ctx.distributed:  # each rank streamed its own copy: none held the 16-bit model
        mine = [peak_rss_gib(), peak_rss_gib() - rss_before]
        both = ctx.all_reduce([v if r == ctx.rank else 0.0 for r in range(ctx.world_size) for v in mine]).tolist()
        per_rank = ", ".join(f"rank {r} {both[2 * r]:.2f} GiB (+{both[2 * r + 1]:.2f})" for r in range(ctx.world_size))
        say(f"peak host memory while loading (and above the pre-load baseline), per rank: {per_rank}", flush=True)
    if streamed:
        say(f"sharded layer by layer while loading: {sharded_load_line(ctx, load_memory)}", flush=True)
    else:
        torch.manual_seed(config.seed)  # the LoRA initialisation
        add_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.target_modules,
            dtype=torch.float32,
        )
    if loftq:
        from ..lora.loftq import loftq_quantize

        errors = loftq_quantize(model, config.quant_type, 64, config.double_quant, compute_dtype=compute_dtype,
                                quant_storage=compute_dtype if shardable else torch.uint8)  # fmt: skip
        plain, ours = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
        say(f"LoftQ initialisation: mean relative weight error {plain:.4f} (plain 4-bit) -> {ours:.4f}", flush=True)
        if (
            ctx.is_main
        ):  # the adapter belongs to this 4-bit base, not to a fresh quantization: keep it (before sharding)
            from ..export import save_base

            save_base(model, output_dir / "base", tokenizer, overwrite=True)
    trainable, total = trainable_parameters(model)
    t_loaded = time.perf_counter()
    say(
        f"loaded in {t_loaded - t_start:.0f} s; trainable params: {trainable:,d} || "
        f"all params: {total:,d} || trainable%: {100 * trainable / total:.4f}",
        flush=True,
    )

    train_records, eval_records = prepare_records(config)
    train = tokenize_records(train_records, tokenizer, config.max_seq_len, train_on_prompt=config.train_on_prompt)
    say(f"train data: {train.summary()}", flush=True)
    train_examples = pack_examples(train.examples, config.max_seq_len) if config.packing else train.examples
    evaluation = None
    if eval_records is not None:
        evaluation = tokenize_records(
            eval_records, tokenizer, config.max_seq_len, train_on_prompt=config.train_on_prompt
        )
        say(f"eval data: {evaluation.summary()}", flush=True)
    trainer = Trainer(model, tokenizer, train_examples, evaluation, config)

    n_acc = min(config.eval_accuracy_samples, len(eval_records)) if eval_records is not None else 0
    chat = n_acc > 0 and "messages" in eval_records.rows[0]
    acc_records = eval_records.rows[:n_acc] if chat else []
    before = None
    earlier = output_dir / "summary.json"
    if acc_records and config.resume is not False and earlier.is_file():
        # A resumed run measured its 'before' when it started; the interrupted run's summary kept it.
        old = json.loads(earlier.read_text())
        if old.get("accuracy_before") is not None:
            before = {"accuracy": old["accuracy_before"], "sample": old["sample_before"]}
    if acc_records and config.resume is False:
        t0 = time.perf_counter()
        before = task_accuracy(model, tokenizer, acc_records, config.generation_max_new_tokens)
        say(
            f"before training: accuracy {before['correct']}/{before['n']} "
            f"({time.perf_counter() - t0:.0f} s); "
            f"sample {before['sample']['prompt']!r} -> {before['sample']['answer']!r}",
            flush=True,
        )

    t_train = time.perf_counter()
    result = trainer.train()
    t_trained = time.perf_counter()
    after = None
    if acc_records and result.stopped_by is None:
        after = task_accuracy(model, tokenizer, acc_records, config.generation_max_new_tokens)
    # gathered from the shards on every rank, written by rank 0 in PEFT's format
    base = str(output_dir / "base") if loftq else config.model
    adapter_dir = save_adapter_gathered(model, output_dir / "adapter", ctx, base_model_name_or_path=base)

    evals = trainer.metrics.series("eval_loss")
    summary = {
        "job": job,
        "output_dir": str(output_dir),
        "adapter": str(adapter_dir),
        "steps": result.step,
        "stopped_by": result.stopped_by,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "eval_loss_before": evals[1][0] if evals[0] and evals[0][0] == 0 else None,
        "eval_loss_after": result.eval_loss if result.stopped_by is None else None,
        "accuracy_before": before["accuracy"] if before else None,
        "accuracy_after": after["accuracy"] if after else None,
        "accuracy_n": n_acc if acc_records else 0,
        "sample_before": before["sample"] if before else None,
        "sample_after": after["sample"] if after else None,
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "seconds": {
            "load": round(t_loaded - t_start, 1),
            "train": round(t_trained - t_train, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "device": str(device),
        "world_size": ctx.world_size,
        "strategy": trainer.strategy,
        "config": config.to_dict(),
    }
    if ctx.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    return summary


def _targets(target_modules: Any) -> str | tuple[str, ...]:
    """target_modules as LoraSettings holds it (a name list becomes a tuple)."""
    return target_modules if isinstance(target_modules, str) else tuple(target_modules)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """print() of the ranks other than 0."""


def _print_summary(s: dict[str, Any]) -> None:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "",
        f"{'':24}{'before':>10}{'after':>10}",
        f"{'eval loss':24}{num(s['eval_loss_before'], '.4f'):>10}{num(s['eval_loss_after'], '.4f'):>10}",
    ]
    if s["accuracy_n"]:
        lines.append(
            f"{'accuracy (' + str(s['accuracy_n']) + ' held-out)':24}"
            f"{num(s['accuracy_before'], '.1%'):>10}{num(s['accuracy_after'], '.1%'):>10}"
        )
    sample = s["sample_after"] or s["sample_before"]
    if sample:
        lines.append(f"sample: {sample['prompt']!r} (expected {sample['expected']!r})")
        if s["sample_before"]:
            lines.append(f"  before: {s['sample_before']['answer']!r}")
        if s["sample_after"]:
            lines.append(f"  after:  {s['sample_after']['answer']!r}")
    sec = s["seconds"]
    lines.append(
        f"{s['steps']} steps; load {sec['load']:.0f} s, training {sec['train']:.0f} s, total {sec['total']:.0f} s"
    )
    lines.append(
        f"wrote {s['adapter']} (PEFT adapter), metrics.jsonl, loss_curve.png and summary.json in {s['output_dir']}"
    )
    print("\n".join(lines), flush=True)
