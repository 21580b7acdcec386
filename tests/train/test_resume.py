"""Exact resume: a run stopped after step k and resumed in a fresh Trainer repeats, bit for bit, the losses of
a run that never stopped (data order, dropout RNG, optimizer and schedule all restored)."""

from __future__ import annotations

import json

from train_testing import synthetic_examples, train_config

from kbit.train import Trainer, latest_checkpoint

TOTAL, STOP = 8, 3


def settings(tmp_path, **overrides):
    # Two micro-batches per step, an epoch boundary inside the run (12 examples / 2 = 6 micro-batches), LoRA
    # dropout (so the RNG matters), warmup + cosine, evaluation between steps and periodic checkpoints.
    base = dict(
        max_steps=TOTAL,
        gradient_accumulation_steps=2,
        warmup_steps=2,
        eval_steps=2,
        save_steps=2,
        save_total_limit=0,
    )
    return train_config(tmp_path, **{**base, **overrides})


def stop_after(k):
    def callback(trainer, record):
        if record["step"] == k:
            trainer.request_stop()

    return callback


def test_stopped_and_resumed_run_equals_uninterrupted_run(make_model, tmp_path):
    train, evaluation = synthetic_examples(12, seed=1), synthetic_examples(4, seed=2)

    straight = Trainer(make_model(dropout=0.1), None, train, evaluation, settings(tmp_path / "a")).train()
    assert len(straight.losses) == TOTAL and straight.stopped_by is None

    first = Trainer(
        make_model(dropout=0.1),
        None,
        train,
        evaluation,
        settings(tmp_path / "b"),
        callbacks=[stop_after(STOP)],
    ).train()
    assert first.stopped_by == "request" and first.step == STOP
    assert latest_checkpoint(tmp_path / "b" / "run").name == f"checkpoint-{STOP}"

    # A fresh process would build a fresh model: different LoRA initialisation, RNG state elsewhere.
    resumed = Trainer(
        make_model(dropout=0.1, seed=123), None, train, evaluation, settings(tmp_path / "b", resume=True)
    ).train()
    assert resumed.step == TOTAL
    assert first.losses + resumed.losses == straight.losses  # exact float equality, step by step
    assert resumed.eval_loss == straight.eval_loss

    # metrics.jsonl reads as one run: every step once, in order
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in records if "loss" in r] == straight.losses


def test_resume_from_an_explicit_checkpoint_and_changed_data_is_refused(make_model, tmp_path):
    import pytest

    from kbit.train import ConfigError

    train = synthetic_examples(12, seed=1)
    Trainer(make_model(), None, train, None, settings(tmp_path, max_steps=4)).train()
    path = tmp_path / "run" / "checkpoint-2"
    result = Trainer(make_model(), None, train, None, settings(tmp_path, max_steps=4, resume=str(path))).train()
    assert result.step == 4 and len(result.losses) == 2
    with pytest.raises(ConfigError, match="the data or batching changed since checkpoint-2 .*num_examples 12 -> 10"):
        Trainer(make_model(), None, train[:10], None, settings(tmp_path, resume=str(path))).train()
    with pytest.raises(ConfigError, match="already holds checkpoint-4; pass --resume"):
        Trainer(make_model(), None, train, None, settings(tmp_path)).train()
