"""Data and config builders for the trainer tests (a module of its own: ``conftest`` names clash across folders)."""

from __future__ import annotations

import random

from kbit.data import IGNORE_INDEX, Example

VOCAB = 96


def synthetic_examples(n: int, seed: int = 0, min_len: int = 6, max_len: int = 24) -> list[Example]:
    """``n`` sequences of uneven length whose second half is the answer (the only supervised part)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        # A learnable pattern: the answer repeats the prompt, so the loss can go down.
        half = length // 2
        ids[half:] = ids[: length - half]
        labels = [IGNORE_INDEX] * half + ids[half:]
        examples.append(Example(ids, labels))
    return examples


def train_config(tmp_path, **overrides) -> dict:
    """A small Trainer config writing into ``tmp_path / 'run'``."""
    config = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        warmup_steps=2,
        logging_steps=1,
        save_steps=0,
        eval_on_start=False,
        report_to="none",
    )
    config.update(overrides)
    return config
