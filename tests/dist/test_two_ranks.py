"""FSDP2 / DDP on 2 CPU processes (gloo) against one-process runs: forward, losses, sharded resume, export, CLI.

One torchrun launch (``dist_worker.py``) does the distributed side of every test and writes its values to
files; each test compares them with what one process computes here. Tolerances: fp32 sums taken in another
order differ by a few ulps, so sharded fp32 logits must agree to 1e-6 and losses to 1e-5 relative; bf16 logits
(LoRA cast to bf16 by FSDP's mixed precision, fp32 in the unsharded model) to 4 bf16 ulps of the largest logit.
Resume is exact: the same ranks replay the same operations, and a model loaded straight into shards holds the
very bytes of one sharded after loading, so its logits are identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_testing import build_model, run_config, save_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_testing import synthetic_examples  # noqa: E402

from kbit.dist import StrategyError  # noqa: E402
from kbit.train import Trainer  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(model folder, output folder, [rank 0 results, rank 1 results]) of one 2-process gloo launch."""
    root = tmp_path_factory.mktemp("two-ranks")
    folder = root / "tiny"
    save_tiny_llama(folder)
    from kbit.export import quantize_model

    quantized = quantize_model(folder, root / "tiny-nf4", compute_dtype=torch.float32)  # uint8 storage
    records = [{"text": f"reverse {w}: {w[::-1]}"} for w in ("abc", "hello", "kbit", "four", "xyz")]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    job = {
        "model": str(folder), "data": str(root / "data.jsonl"), "output_dir": str(root / "cli-run"),
        "max_steps": 2, "per_device_train_batch_size": 2, "max_seq_len": 32, "lora_r": 4, "strategy": "fsdp",
        "device": "cpu", "bf16": False, "report_to": "none", "eval_on_start": False, "save_steps": 0,
    }  # fmt: skip
    (root / "job.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in job.items()))
    out = root / "out"
    out.mkdir()
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*launch, str(WORKER), str(folder), str(quantized), str(out)], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"the 2-rank launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    (out / "launch.log").write_text(proc.stdout)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return folder, out, results


def one_process_losses(folder, tmp_path) -> tuple[list[float], torch.nn.Module]:
    """The same 4 steps in one process with the whole global batch (2 ranks x 2 = 4 per micro-batch)."""
    model = build_model(folder)
    config = run_config(tmp_path, "none", per_device_train_batch_size=4)
    result = Trainer(model, None, synthetic_examples(13, seed=1), None, config).train()
    return result.losses, model


def test_sharded_forward_equals_unsharded(two_ranks):
    _, _, results = two_ranks
    for r in results:
        assert r["forward_fp32_max_diff"] <= 1e-6
        ulp = torch.finfo(torch.bfloat16).eps * r["forward_bf16_max_logit"]  # eps = 2^-7: one ulp at 1
        assert r["forward_bf16_max_diff"] <= 4 * ulp
        for dtype in ("fp32", "bf16"):  # the packed 4-bit weight really is split between the ranks
            assert r[f"packed_{dtype}_local_rows"] * 2 == r[f"packed_{dtype}_full_rows"]


def test_streamed_load_equals_sharding_after_loading(two_ranks):
    _, _, results = two_ranks
    for dtype in ("fp32", "bf16"):
        for r in results:
            assert r[f"streamed_{dtype}_max_diff"] == 0.0 and r[f"streamed_{dtype}_same_params"]
            # each rank holds half of every parameter: together exactly the whole model's parameter bytes
            assert r[f"streamed_{dtype}_param_bytes"] * 2 == r[f"whole_{dtype}_param_bytes"]
            # while loading: never the whole model (what the old path holds before sharding), at most this
            # rank's shards plus one whole unit (a decoder layer, or the root: embeddings, head, final norm)
            peak, final = r[f"streamed_{dtype}_peak_model_bytes"], r[f"streamed_{dtype}_final_model_bytes"]
            assert peak < r[f"whole_{dtype}_model_bytes"]
            assert final < peak <= final + r[f"whole_{dtype}_largest_unit_bytes"]
            assert r[f"streamed_{dtype}_peak_host_gib"] > 0
        assert sum(r[f"streamed_{dtype}_param_bytes"] for r in results) == results[0][f"whole_{dtype}_param_bytes"]


def test_bitsandbytes_checkpoint_loads_into_shards_and_errors(two_ranks):
    _, _, results = two_ranks
    r = results[1]
    assert r["checkpoint_max_diff"] == 0.0  # uint8 storage re-viewed as float32 (the compute dtype): same bytes
    assert r["checkpoint_storage"] == ["torch.float32"]
    assert r["error_checkpoint_storage"].startswith(
        "model.layers.0.self_attn.q_proj: quant_storage uint8 differs from the compute dtype float32 that FSDP"
    )
    assert r["error_int8"].startswith("bits 8: FSDP cannot shard int8 weights")
    assert r["error_modules_to_save"].startswith("modules_to_save: a sharded load puts LoRA on each layer")
    assert "already sharded with FSDP" in r["error_ddp_on_sharded"] and "use strategy fsdp" in r["error_ddp_on_sharded"]
    assert r["error_offload_mismatch"].startswith("cpu_offload: true asked for, but the model was sharded with")


def test_out_of_memory_names_rank_batch_and_estimate(two_ranks):
    import re

    from kbit.estimate import estimate, load_config, model_shape

    folder, _, results = two_ranks
    shape = model_shape(load_config(folder))
    for rank, r in enumerate(results):
        message = r["oom_message"]
        assert r["oom_cause"] == "RuntimeError"  # the CPU allocator's own failure, re-raised with the report
        assert message.startswith(f"rank {rank} of 2 (cpu) ran out of memory in step 1: micro-batch of 2 x ")
        batch, seq_len = (int(v) for v in re.search(r"micro-batch of (\d+) x (\d+) tokens", message).groups())
        assert "(one of 2 accumulated per step), strategy fsdp" in message
        # the estimate for this rank: FSDP over 2 ranks, LoRA r=4, no activation checkpointing on the CPU
        est = estimate(shape, seq_len, batch, lora_r=4, world_size=2, strategy="fsdp", gradient_checkpointing=False)
        assert f"kbit estimates {est.total / 2**30:.2f} GiB for this rank (weights " in message
        assert "; try activation checkpointing" in message and "more GPUs" in message and "\n" not in message


def test_losses_equal_one_process_run(two_ranks, tmp_path):
    folder, _, results = two_ranks
    expected, _ = one_process_losses(folder, tmp_path)
    for r in results:
        for strategy in ("fsdp", "ddp"):
            assert r[f"{strategy}_strategy"] == strategy
            assert r[f"{strategy}_losses"] == pytest.approx(expected, rel=1e-5, abs=0)
        # loaded into shards, strategy auto, activation checkpointing through the FSDP units
        assert r["streamed_strategy"] == "fsdp"
        assert r["streamed_losses"] == pytest.approx(expected, rel=1e-5, abs=0)
    assert results[0]["fsdp_losses"] == results[1]["fsdp_losses"]  # all-reduced: every rank reports the same


def test_resume_restores_every_rank_shard_and_continues_exactly(two_ranks):
    _, out, results = two_ranks
    for strategy in ("fsdp", "ddp"):
        for rank, r in enumerate(results):
            shards = torch.load(out / f"rank{rank}-{strategy}-shards.pt", weights_only=True)
            assert shards["saved"].keys() == shards["loaded"].keys() and shards["saved"]
            for name, saved in shards["saved"].items():
                assert torch.equal(shards["loaded"][name], saved), (strategy, rank, name)
                assert not torch.equal(shards["init"][name], saved), (strategy, rank, name)  # not the init values
            assert r[f"{strategy}_first_losses"] + r[f"{strategy}_resumed_losses"] == r[f"{strategy}_losses"]


def test_exported_adapter_loads_in_one_process_and_merges(two_ranks, tmp_path):
    from kbit.cli import main as kbit_main
    from kbit.export import load_adapter
    from kbit.models.load import load_model

    folder, out, _ = two_ranks
    for strategy in ("fsdp", "ddp"):
        model = load_model(folder, compute_dtype=torch.float32, device="cpu")
        load_adapter(model, out / f"{strategy}-adapter", dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.arange(1, 17).reshape(2, 8)).logits.float()
        expected = torch.load(out / f"{strategy}-final-logits.pt", weights_only=True)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    merged = tmp_path / "merged"
    args = ["merge", "--model", str(folder), "--adapter", str(out / "fsdp-adapter"), "--out", str(merged)]
    assert kbit_main([*args, "--dtype", "fp32", "--no-report"]) == 0
    assert (merged / "config.json").is_file()


def test_torchrun_kbit_train_cli(two_ranks):
    folder, out, _ = two_ranks
    assert [(out / f"rank{r}-cli-rc").read_text() for r in range(2)] == ["0", "0"]
    run = out.parent / "cli-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp" and summary["steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # rank 0 alone writes the metrics
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "sharded" / ".metadata").is_file()
    log = (out / "launch.log").read_text()  # kbit train loaded each rank's model straight into shards
    assert "sharded layer by layer while loading: rank 0 at most" in log and "; rank 1 at most" in log


def test_clear_errors_without_a_process_group(two_ranks, tmp_path):
    folder, _, results = two_ranks
    assert "quant_storage uint8 differs from the compute dtype bfloat16" in results[0]["mismatch_error"]
    assert "cpu_offload" in results[0]["offload_error"] and "drop cpu_offload" in results[0]["offload_error"]
    data = synthetic_examples(4)
    with pytest.raises(StrategyError, match="strategy fsdp needs a process group: launch with torchrun"):
        Trainer(build_model(folder), None, data, None, run_config(tmp_path, "fsdp"))
    with pytest.raises(StrategyError, match="cpu_offload offloads FSDP shards, but strategy none"):
        Trainer(build_model(folder), None, data, None, run_config(tmp_path, "none", cpu_offload=True))
