"""What each of the 2 gloo ranks does in tests/dist (run by torchrun; every check writes its values to JSON).

``python -m torch.distributed.run --standalone --nproc-per-node 2 dist_worker.py MODEL_DIR OUT_DIR`` writes
``OUT_DIR/rank<r>.json`` and ``OUT_DIR/rank<r>-shards-*.pt``; the tests compare them with one-process runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # train_testing: the synthetic data
from dist_testing import build_model, peak_rss_mib, run_config  # noqa: E402
from train_testing import synthetic_examples  # noqa: E402

from kbit.dist import StrategyError, init_distributed, local_tensor, shard_model  # noqa: E402
from kbit.dist.checkpoint import save_adapter_gathered  # noqa: E402
from kbit.nn import Linear4bit  # noqa: E402
from kbit.train import Trainer  # noqa: E402

STOP = 2


def forward_checks(folder: Path, ctx, ids: torch.Tensor) -> dict:
    """Sharded logits against the same rank's unsharded copy, fp32 and bf16; the packed weight's shard size."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        reference, model = build_model(folder, dtype), build_model(folder, dtype)
        with torch.no_grad():
            expected = reference(input_ids=ids).logits.float()
            shard_model(model, ctx)
            got = model(input_ids=ids).logits.float()
        out[f"forward_{name}_max_diff"] = (got - expected).abs().max().item()
        out[f"forward_{name}_max_logit"] = expected.abs().max().item()
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
    folder, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    ctx = init_distributed("cpu")
    result = {"rank": ctx.rank, "world_size": ctx.world_size}
    build_model(folder)
    result["peak_rss_after_load_mib"] = peak_rss_mib()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    result.update(forward_checks(folder, ctx, ids))
    for strategy in ("fsdp", "ddp"):
        result.update(train_checks(folder, out_dir, ctx, strategy))
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result, indent=1))
    # Last, the command line as `torchrun -m kbit train CONFIG.yaml` runs it (it closes the process group).
    from kbit.cli import main as kbit_main

    rc = kbit_main(["train", str(out_dir.parent / "job.yaml")])
    (out_dir / f"rank{ctx.rank}-cli-rc").write_text(str(rc))


if __name__ == "__main__":
    main()
