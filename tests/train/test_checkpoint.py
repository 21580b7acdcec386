"""Checkpoints: complete or absent after a crash mid-save, rotation, PEFT-loadable adapters."""

from __future__ import annotations

import pytest
import torch
from train_testing import synthetic_examples, train_config

from kbit.export.adapter import load_adapter
from kbit.train import Trainer, latest_checkpoint, list_checkpoints
from kbit.train import checkpoint as ckpt


def test_crash_mid_save_leaves_no_complete_looking_checkpoint(make_model, tmp_path, monkeypatch):
    train = synthetic_examples(12)
    config = train_config(tmp_path, max_steps=6, save_steps=2, save_total_limit=0)
    real_save = torch.save

    def crash_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            real_save({"half": "written"}, f)  # part of the file is on disk when the "power goes out"
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        Trainer(make_model(), None, train, None, config).train()
    run = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert not (run / "checkpoint-4").exists()
    assert not list(run.glob("*.tmp-*"))  # the failed save cleaned up after itself

    # A kill -9 cannot clean up: leave what it would, and check that nothing of it is taken for a checkpoint.
    (run / "checkpoint-6.tmp-99999").mkdir()
    (run / "checkpoint-6.tmp-99999" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (run / "checkpoint-5").mkdir()  # renamed but unmarked cannot happen with kbit, but must not count either
    assert latest_checkpoint(run).name == "checkpoint-2"

    monkeypatch.setattr(ckpt.torch, "save", real_save)
    result = Trainer(make_model(), None, train, None, dict(config, resume=True)).train()
    assert result.step == 6 and len(result.losses) == 4  # resumed from step 2
    assert not (run / "checkpoint-6.tmp-99999").exists()  # stale temporary folders are removed
    assert [step for step, _ in list_checkpoints(run)] == [2, 4, 6]


def test_rotation_keeps_the_newest(make_model, tmp_path):
    config = train_config(tmp_path, max_steps=5, save_steps=1, save_total_limit=2)
    Trainer(make_model(), None, synthetic_examples(8), None, config).train()
    assert [p.name for _, p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-5"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]


def test_checkpoint_contents_and_adapter_format(make_model, tmp_path):
    model = make_model()
    Trainer(model, None, synthetic_examples(8), None, train_config(tmp_path, max_steps=2)).train()
    path = tmp_path / "run" / "checkpoint-2"
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "COMPLETE",
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "training_state.pt",
    ]
    state = ckpt.load_state(path)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng", "data"} <= state.keys()
    assert state["data"]["epoch"] == 0 and state["data"]["micro_batch_in_epoch"] == 2
    # the checkpoint is a PEFT adapter folder: a fresh model loads it and gets the trained weights
    fresh = make_model(seed=7)
    load_adapter(fresh, path)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name
