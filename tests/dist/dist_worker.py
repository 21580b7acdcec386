"""What each of the 2 gloo ranks does in tests/dist (run by torchrun; every check writes its values to JSON).

``python -m torch.distributed.run --standalone --nproc-per-node 2 dist_worker.py MODEL_DIR QUANTIZED_DIR OUT_DIR``
writes ``OUT_DIR/rank<r>.json`` and ``OUT_DIR/rank<r>-shards-*.pt``; the tests compare them with one-process runs.
QUANTIZED_DIR is MODEL_DIR written by ``kbit quantize`` (a bitsandbytes checkpoint: uint8 storage).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # train_testing: the synthetic data
from dist_testing import build_model, build_sharded, peak_rss_mib, run_config  # noqa: E402
from train_testing import synthetic_examples  # noqa: E402

from kbit.dist import (  # noqa: E402
    LayerPlacer,
    RankOutOfMemoryError,
    StrategyError,
    init_distributed,
    load_sharded,
    local_tensor,
    match_quant_storage,
    shard_model,
)
from kbit.dist.checkpoint import save_adapter_gathered  # noqa: E402
from kbit.dist.loading import resident_bytes  # noqa: E402
from kbit.lora.inject import LoraSettings  # noqa: E402
from kbit.models.load import load_model  # noqa: E402
from kbit.nn import Linear4bit  # noqa: E402
from kbit.quant import as_bytes  # noqa: E402
from kbit.train import Trainer  # noqa: E402

STOP = 2


def param_bytes(model) -> int:
    """Bytes of this rank's part of every parameter (its shard of a sharded one)."""
    return sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters())


def forward_checks(folder: Path, ctx, ids: torch.Tensor) -> dict:
    """Sharded logits against the same rank's unsharded copy, fp32 and bf16; the packed weight's shard size.

    Also the model loaded straight into shards (load_sharded) against the one sharded after loading: logits,
    LoRA values, this rank's parameter bytes, and the most model bytes each path held on the device while loading.
    """
    out = {}
    cpu = torch.device("cpu")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        reference, model = build_model(folder, dtype), build_model(folder, dtype)
        out[f"whole_{name}_param_bytes"] = param_bytes(reference)
        # what the old path holds before shard_model: the whole model, and its units one by one
        out[f"whole_{name}_model_bytes"] = resident_bytes(reference, cpu)
        layer_bytes = [resident_bytes(layer, cpu) for layer in reference.model.layers]
        out[f"whole_{name}_largest_unit_bytes"] = max(*layer_bytes, out[f"whole_{name}_model_bytes"] - sum(layer_bytes))
        streamed, memory = build_sharded(folder, ctx, dtype)
        # before any forward: FSDP keeps the root unit gathered after one (its backward needs it at once)
        out[f"streamed_{name}_param_bytes"] = param_bytes(streamed)
        with torch.no_grad():
            expected = reference(input_ids=ids).logits.float()
            shard_model(model, ctx)
            got = model(input_ids=ids).logits.float()
            got_streamed = streamed(input_ids=ids).logits.float()
        out[f"forward_{name}_max_diff"] = (got - expected).abs().max().item()
        out[f"forward_{name}_max_logit"] = expected.abs().max().item()
        out[f"streamed_{name}_max_diff"] = (got_streamed - got).abs().max().item()
        out[f"streamed_{name}_same_params"] = all(  # bytes: packed 4-bit storage may hold NaN patterns
            torch.equal(as_bytes(local_tensor(a.detach())), as_bytes(local_tensor(b.detach())))
            for a, b in zip(model.parameters(), streamed.parameters(), strict=True)
        )
        out[f"streamed_{name}_peak_model_bytes"] = memory.peak_model_bytes
        out[f"streamed_{name}_final_model_bytes"] = memory.final_model_bytes
        out[f"streamed_{name}_peak_host_gib"] = memory.peak_host_gib
        layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
        ref_layer = next(m for m in reference.modules() if isinstance(m, Linear4bit))
        out[f"packed_{name}_local_rows"] = local_tensor(layer.weight).shape[0]
        out[f"packed_{name}_full_rows"] = ref_layer.weight.shape[0]
    try:  # uint8 storage under a bf16 policy would be corrupted: refused before any collective
        shard_model(build_model(folder, torch.bfloat16, quant_storage=torch.uint8), ctx)
        out["mismatch_error"] = None
    except StrategyError as e:
        out["mismatch_error"] = str(e)
    try:  # FSDP's CPU offload moves shards off a GPU: nothing to offload on a CPU run
        shard_model(build_model(folder), ctx, cpu_offload=True)
        out["offload_error"] = None
    except StrategyError as e:
        out["offload_error"] = str(e)
    return out


def checkpoint_checks(folder: Path, quantized: Path, ctx, ids: torch.Tensor) -> dict:
    """A bitsandbytes checkpoint (uint8 storage) loaded into shards equals it loaded whole, then sharded; and the
    errors of a sharded load or of a model that was sharded while loading."""
    reference = load_model(quantized, compute_dtype=torch.float32, device="cpu")  # keeps the checkpoint's uint8
    out = {}
    try:
        shard_model(reference, ctx)
    except StrategyError as e:
        out["error_checkpoint_storage"] = str(e)
    match_quant_storage(reference, torch.float32)
    streamed, _ = load_sharded(quantized, ctx, None, compute_dtype=torch.float32)
    with torch.no_grad():
        expected = shard_model(reference, ctx)(input_ids=ids).logits.float()
        got = streamed(input_ids=ids).logits.float()
    out["checkpoint_max_diff"] = (got - expected).abs().max().item()
    out["checkpoint_storage"] = sorted({str(m.weight.dtype) for m in streamed.modules() if isinstance(m, Linear4bit)})
    errors = {
        "int8": lambda: load_sharded(folder, ctx, None, bits=8),
        "modules_to_save": lambda: LayerPlacer(ctx, torch.float32, LoraSettings(modules_to_save=("lm_head",))),
        "ddp_on_sharded": lambda: Trainer(streamed_lora(folder, ctx), None, synthetic_examples(4), None,
                                          run_config(folder.parent / "e1", "ddp")),
        "offload_mismatch": lambda: Trainer(streamed_lora(folder, ctx), None, synthetic_examples(4), None,
                                            run_config(folder.parent / "e2", "auto", cpu_offload=True)),
    }  # fmt: skip
    for key, make in errors.items():
        try:
            make()
            out[f"error_{key}"] = None
        except StrategyError as e:
            out[f"error_{key}"] = str(e)
    return out


def streamed_lora(folder: Path, ctx):
    """build_sharded's model alone."""
    return build_sharded(folder, ctx)[0]


def streamed_train_checks(folder: Path, out_dir: Path, ctx) -> dict:
    """The run of train_checks on a model loaded into shards, with activation checkpointing (FSDP units inside
    transformers' checkpointed layers), strategy auto (resolves to fsdp for a sharded model)."""
    train = synthetic_examples(13, seed=1)
    config = run_config(out_dir / "streamed", "auto", gradient_checkpointing=True)
    trainer = Trainer(streamed_lora(folder, ctx), None, train, None, config)
    return {"streamed_losses": trainer.train().losses, "streamed_strategy": trainer.strategy}


def oom_checks(folder: Path, out_dir: Path, ctx) -> dict:
    """A real allocation failure in a step's forward on both ranks (a hook asks the CPU allocator for 1 PiB after
    the second decoder layer), as the trainer reports it."""
    model = streamed_lora(folder, ctx)
    model.model.layers[1].register_forward_hook(lambda module, args, output: torch.empty(2**50, dtype=torch.uint8))
    trainer = Trainer(model, None, synthetic_examples(8), None, run_config(out_dir / "oom", "fsdp"))
    try:
        trainer.train()
        return {"oom_message": None}
    except RankOutOfMemoryError as e:
        return {"oom_message": str(e), "oom_cause": type(e.__cause__).__name__}


def trainable_shards(model) -> dict[str, torch.Tensor]:
    """Copies of this rank's part of every trainable parameter (its DTensor shard under FSDP)."""
    return {n: local_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def train_checks(folder: Path, out_dir: Path, ctx, strategy: str) -> dict:
    """A run of 4 steps; the same run stopped after STOP and resumed into a model of another LoRA init."""
    train = synthetic_examples(13, seed=1)  # 13: the epoch's last global batch of 4 leaves rank 1 empty
    full = Trainer(build_model(folder), None, train, None, run_config(out_dir / f"{strategy}-a", strategy)).train()
    shards_at_stop: dict[str, torch.Tensor] = {}

    def stop_after(trainer, record):
        if record["step"] == STOP:  # the state save_checkpoint writes right after this callback
            shards_at_stop.update(trainable_shards(trainer.model))
            trainer.request_stop()

    config_b = run_config(out_dir / f"{strategy}-b", strategy)
    first = Trainer(build_model(folder), None, train, None, config_b, callbacks=[stop_after]).train()
    resumed_trainer = Trainer(build_model(folder, seed=123), None, train, None, dict(config_b, resume=True))
    init_shards = trainable_shards(resumed_trainer.model)
    resumed_trainer.load_checkpoint(out_dir / f"{strategy}-b" / "run" / f"checkpoint-{STOP}")
    loaded = trainable_shards(resumed_trainer.model)
    # train() finds the newest checkpoint and loads it again, as `kbit train --resume` does
    resumed = resumed_trainer.train()
    shard_file = out_dir / f"rank{ctx.rank}-{strategy}-shards.pt"
    torch.save({"saved": shards_at_stop, "loaded": loaded, "init": init_shards}, shard_file)
    save_adapter_gathered(resumed_trainer.model, out_dir / f"{strategy}-adapter", ctx, base_model_name_or_path=None)
    with torch.no_grad():
        ids = torch.arange(1, 17).reshape(2, 8)
        logits = resumed_trainer.model.eval()(input_ids=ids).logits.float()
    if ctx.is_main:
        torch.save(logits, out_dir / f"{strategy}-final-logits.pt")
    return {
        f"{strategy}_losses": full.losses,
        f"{strategy}_first_losses": first.losses,
        f"{strategy}_resumed_losses": resumed.losses,
        f"{strategy}_strategy": resumed_trainer.strategy,
    }


def main() -> None:
    folder, quantized, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    ctx = init_distributed("cpu")
    result = {"rank": ctx.rank, "world_size": ctx.world_size}
    build_model(folder)
    result["peak_rss_after_load_mib"] = peak_rss_mib()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    result.update(forward_checks(folder, ctx, ids))
    result.update(checkpoint_checks(folder, quantized, ctx, ids))
    for strategy in ("fsdp", "ddp"):
        result.update(train_checks(folder, out_dir, ctx, strategy))
    result.update(streamed_train_checks(folder, out_dir, ctx))
    result.update(oom_checks(folder, out_dir, ctx))
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result, indent=1))
    # Last, the command line as `torchrun -m kbit train CONFIG.yaml` runs it (it closes the process group).
    from kbit.cli import main as kbit_main

    rc = kbit_main(["train", str(out_dir.parent / "job.yaml")])
    (out_dir / f"rank{ctx.rank}-cli-rc").write_text(str(rc))


if __name__ == "__main__":
    main()
