"""Load a data source into normalized records (``messages`` or ``text``) that remember their origin."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRecords, DataError
from .formats import check_format_name, detect_format, normalize_record
from .readers import read_source


@dataclass
class Records:
    """Normalized records of one format; ``where[i]`` is ``rows[i]``'s file:line (or file[index])."""

    rows: list[dict] = field(repr=False)
    where: list[str] = field(repr=False)
    format: str
    source: str
    skipped: int = 0  # bad records left out because skip_bad_records was set

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def subset(self, indices: list[int]) -> Records:
        """The records at ``indices`` (in that order), keeping their locations."""
        return Records(
            [self.rows[i] for i in indices],
            [self.where[i] for i in indices],
            self.format,
            self.source,
        )


def load_dataset(source: Any, format: str = "auto", *, skip_bad_records: bool = False) -> Records:
    """Read ``source`` (a .jsonl/.json/.csv/.tsv/.parquet path, a list of dicts or a datasets.Dataset) and
    normalize every record to ``{"messages": [...]}`` or ``{"text": ...}``; bad records raise DataError or,
    with ``skip_bad_records``, are counted in ``Records.skipped``."""
    check_format_name(format)
    name, located = read_source(source)
    if not located:
        raise DataError(f"{name}: no data (it holds no records); give a file with at least one record")
    readable = [(where, record) for where, record in located if isinstance(record, dict)]
    if format == "auto" and readable:
        format = detect_format(readable)
    on_bad = BadRecords(skip_bad_records)
    rows, where = [], []
    for loc, record in located:  # in file order, so the first bad record is the one reported
        if isinstance(record, dict):
            try:
                record = normalize_record(record, format, loc)
            except DataError as e:
                record = e
        if isinstance(record, DataError):
            on_bad(record)
            continue
        rows.append(record)
        where.append(loc)
    if not rows:
        raise DataError(f"{name}: no valid record ({on_bad.count} bad records skipped); fix the data")
    return Records(rows, where, format, name, skipped=on_bad.count)


def split_records(records: Records, eval_fraction: float, seed: int = 0) -> tuple[Records, Records]:
    """Split into (train, eval) by a seeded shuffle; eval gets round(len * eval_fraction) records, >= 1."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise DataError(
            f"{records.source}: {len(records)} records are too few to hold out {eval_fraction:.0%} for eval "
            "and keep some for training; give more data, a smaller eval fraction or a separate eval file"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    # Keep each side in file order: stable batches and error messages that read top to bottom.
    return records.subset(sorted(order[n_eval:])), records.subset(sorted(order[:n_eval]))
