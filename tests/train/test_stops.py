"""Stopping: SIGTERM/SIGINT save a checkpoint and return; NaN stops before the update and names the step."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from train_testing import synthetic_examples, train_config

from kbit.train import Trainer, TrainingDiverged, latest_checkpoint
from kbit.train import checkpoint as ckpt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_returns(make_model, tmp_path, sig, capsys):
    before = signal.getsignal(sig)

    def send_after_step_2(trainer, record):
        if record["step"] == 2:
            os.kill(os.getpid(), sig)

    trainer = Trainer(
        make_model(),
        None,
        synthetic_examples(12),
        None,
        train_config(tmp_path, max_steps=6),
        callbacks=[send_after_step_2],
    )
    result = trainer.train()
    assert result.stopped_by == sig.name and result.step == 2 and len(result.losses) == 2
    assert result.checkpoint == latest_checkpoint(tmp_path / "run") and result.checkpoint.name == "checkpoint-2"
    assert signal.getsignal(sig) == before  # handlers are restored
    out = capsys.readouterr().out
    assert f"{sig.name}: finishing step 3" in out and "continue with --resume" in out


def test_nan_loss_stops_before_the_update_and_saves_the_last_good_state(make_model, tmp_path):
    model = make_model()
    trainer = Trainer(model, None, synthetic_examples(12), None, train_config(tmp_path, max_steps=6))

    def poison(module, inputs, output):  # the final norm's output turns NaN from step 3 on
        return output * float("nan") if trainer.step >= 2 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("loss is nan at step 3: stopped before updating the weights")
    assert "checkpoint-2" in message and "learning_rate" in message and "\n" not in message
    path = latest_checkpoint(tmp_path / "run")
    assert path.name == "checkpoint-2" and ckpt.load_state(path)["step"] == 2
    # weights were not touched by the bad step: they are finite and equal the checkpoint's
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    fresh = make_model(seed=9)
    ckpt.load_weights(fresh, path)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name
