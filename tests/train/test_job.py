"""A whole ``kbit train CONFIG.yaml`` run on the tiny model (data file, eval split, packing, summary), then
``--resume`` to more steps: fast stand-ins for the default job's flow."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import yaml

from kbit.train.cli import run_train

SENTENCES = [
    "the date is 2021-03-05.",
    "convert May 1, 1999 to 1999-05-01.",
    "hello world, says the model!",
    "QLoRA trains LoRA on a 4-bit base.",
]


def test_config_file_run_then_resume(tiny_model_with_tokenizer, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{s} ({i})"}) + "\n" for i in range(8) for s in SENTENCES))
    run = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_with_tokenizer),
                "data": str(data),
                "eval_fraction": 0.25,
                "packing": True,
                "max_seq_len": 64,
                "lora_r": 4,
                "lora_alpha": 8,
                "max_steps": 4,
                "per_device_train_batch_size": 2,
                "learning_rate": "5e-3",
                "save_steps": 2,
                "logging_steps": 1,
                "output_dir": str(run),
                "device": "cpu",
                "report_to": "none",
            }
        )
    )
    assert run_train(Namespace(train_argv=[str(config)])) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["job"] == "job"
    assert summary["eval_loss_before"] > summary["eval_loss_after"] > 0
    assert summary["accuracy_n"] == 0  # plain text: no checkable answers
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    out = capsys.readouterr().out
    assert "eval loss" in out and "train data: 24 sequences" in out

    # More steps on the same run: resume picks up checkpoint-4 (flags override the file).
    assert run_train(Namespace(train_argv=[str(config), "--max-steps", "6", "--resume"])) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == 6 and resumed["eval_loss_before"] == summary["eval_loss_before"]
    assert "resumed from" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # A fresh run into the same folder is refused with a hint instead of mixing two runs.
    assert run_train(Namespace(train_argv=[str(config)])) == 1
    assert "already holds checkpoint-6; pass --resume" in capsys.readouterr().err


def test_loftq_job_saves_the_base_its_adapter_needs(tiny_model_with_tokenizer, tmp_path):
    """lora_init: loftq trains on a 4-bit base of its own; the run writes it beside the adapter, and only with it does
    the adapter come close to the original model (a fresh quantization plus the same adapter is further off)."""
    import torch

    from kbit.export import load_adapter, read_adapter_config
    from kbit.models import load_model

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{s} ({i})"}) + "\n" for i in range(4) for s in SENTENCES))
    run = tmp_path / "run"
    job = dict(model=str(tiny_model_with_tokenizer), data=str(data), lora_init="loftq", lora_r=8, lora_alpha=16,
               lora_dropout=0.0, max_steps=2, learning_rate="1e-5", per_device_train_batch_size=2, max_seq_len=64,
               save_steps=0, output_dir=str(run), device="cpu", report_to="none")  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_train(Namespace(train_argv=[str(tmp_path / "job.yaml")])) == 0
    assert read_adapter_config(run / "adapter")["base_model_name_or_path"] == str(run / "base")

    f32 = dict(device="cpu", compute_dtype=torch.float32)
    dense = load_model(tiny_model_with_tokenizer, bits=16, **f32)
    ours = load_adapter(load_model(run / "base", **f32), run / "adapter", dtype=torch.float32)
    fresh = load_adapter(load_model(tiny_model_with_tokenizer, **f32), run / "adapter", dtype=torch.float32)
    assert ours.kbit_load_config.pre_quantized
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits
        err_ours = (ours(ids).logits - ref).norm() / ref.norm()
        err_fresh = (fresh(ids).logits - ref).norm() / ref.norm()
    assert err_ours < err_fresh, (err_ours, err_fresh)  # measured 0.067 vs 0.094
    key = "model.layers.0.mlp.up_proj.base_layer.weight"
    assert not torch.equal(ours.state_dict()[key], fresh.state_dict()[key])  # its own 4-bit base, not a requantization


def test_loftq_needs_four_bits():
    from kbit.train.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="lora_init: loftq needs bits: 4"):
        build_config(overrides={"lora_init": "loftq", "bits": 8})
