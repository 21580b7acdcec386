"""Metrics: metrics.jsonl holds numbers for every logging step and eval, loss_curve.png is a real PNG."""

from __future__ import annotations

import json
import math

import pytest
from train_testing import synthetic_examples, train_config

from kbit.train import Trainer
from kbit.train.metrics import MetricsLogger


def test_metrics_files(make_model, tmp_path, capsys):
    config = train_config(
        tmp_path,
        max_steps=6,
        logging_steps=2,
        eval_steps=3,
        eval_on_start=True,
        save_steps=3,
        report_to="auto",
    )
    Trainer(make_model(), None, synthetic_examples(12), synthetic_examples(4, seed=9), config).train()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6]  # the first step is always logged
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in train:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "memory_gib", "epoch"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, key
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    png = (run / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the checkpoint at step 3 wrote the plot too (it is rewritten at the end)
    out = capsys.readouterr().out
    assert "step 2/6 | loss" in out and "tok/s" in out and "GiB" in out and "step 3: eval loss" in out


def test_plot_and_tensorboard_note(tmp_path):
    log = MetricsLogger(tmp_path, report_to="auto")
    for step in range(1, 6):
        log.log({"step": step, "loss": 3.0 / step})
    log.log({"step": 5, "eval_loss": 0.9})
    path = log.plot()
    assert path.name == "loss_curve.png" and path.stat().st_size > 5000
    assert log.series("loss") == ([1, 2, 3, 4, 5], [3.0, 1.5, 1.0, 0.75, 0.6])
    assert "TensorBoard" in log.tensorboard_note


def test_tensorboard_event_files(tmp_path):
    """Every numeric metric also goes to TensorBoard: read the event files back with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, report_to="tensorboard")
    log.log({"step": 1, "loss": 2.5, "learning_rate": 1e-4})
    log.log({"step": 2, "loss": 2.0, "learning_rate": 1e-4})
    log.log({"step": 2, "eval_loss": 1.75})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(2, 1.75)]
