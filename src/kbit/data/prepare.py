"""One call from data sources to tokenized train/eval examples: load, split, tokenize, pack."""

from __future__ import annotations

import dataclasses
from typing import Any

from .encode import TokenizedData, tokenize_records
from .load import load_dataset, split_records
from .packing import pack_examples


def prepare_data(
    train: Any,
    tokenizer: Any,
    max_seq_len: int,
    *,
    eval: Any = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    format: str = "auto",
    train_on_prompt: bool = False,
    pack: bool = False,
    skip_bad_records: bool = False,
) -> tuple[TokenizedData, TokenizedData | None]:
    """(train, eval) tokenized data; eval comes from ``eval`` (a source), a seeded ``eval_fraction`` of
    ``train``, or is None; with ``pack`` the train examples are packed to ``max_seq_len``."""
    if eval is not None and eval_fraction:
        raise ValueError("give either an eval source or an eval_fraction, not both")
    records = load_dataset(train, format, skip_bad_records=skip_bad_records)
    eval_records = None
    if eval is not None:
        eval_records = load_dataset(eval, format, skip_bad_records=skip_bad_records)
    elif eval_fraction:
        records, eval_records = split_records(records, eval_fraction, seed)
    train_data = tokenize_records(records, tokenizer, max_seq_len, train_on_prompt=train_on_prompt)
    if pack:
        # Only train is packed: eval keeps one example per sequence, so per-example metrics stay simple.
        train_data = dataclasses.replace(train_data, examples=pack_examples(train_data.examples, max_seq_len))
    eval_data = None
    if eval_records is not None:
        eval_data = tokenize_records(eval_records, tokenizer, max_seq_len, train_on_prompt=train_on_prompt)
    return train_data, eval_data
