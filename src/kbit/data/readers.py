"""Readers: turn a file or an in-memory dataset into raw records, each tagged with where it came from.

Every record travels with a location string used in error messages: ``path:line`` (1-based) for JSONL and CSV,
``path[index]`` (0-based) for JSON and Parquet, ``Dataset[index]`` for in-memory datasets. A bad line or
record comes back as a DataError in its place, so the caller reports bad records in file order (or skips
them); a file that cannot be read at all raises at once.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import SKIP_HINT, DataError

Located = tuple[str, dict | DataError]  # (where, record or why it is bad)

# Keys under which JSON files commonly nest their record list ({"data": [...]}, {"train": [...]}, ...).
RECORD_LIST_KEYS = ("data", "train", "examples", "records", "rows", "instances", "items")


def read_source(source: Any) -> tuple[str, list[Located]]:
    """Read a path (.jsonl/.json/.csv/.tsv/.parquet) or a dataset object: (its name, located records)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return str(source), read_file(path)
    return _object_name(source), read_object(source)


def read_file(path: Path) -> list[Located]:
    """Read one data file, choosing the reader from the file's suffix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; check the path")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".pq"):
        return read_parquet(path)
    raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def read_jsonl(path: Path) -> list[Located]:
    """One JSON object per line; blank lines are ignored."""
    records: list[Located] = []
    with open(path, "rb") as f:
        # Decoding line by line (not the whole file) lets an encoding error name its line too.
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except UnicodeDecodeError as e:
                record = _bad(where, f"not UTF-8 text ({e.reason}); save the file as UTF-8")
            except json.JSONDecodeError as e:
                record = _bad(where, f"malformed JSON ({e.msg} at column {e.colno}); fix the line")
            if not isinstance(record, (dict, DataError)):
                record = _bad(where, f"expected a JSON object per line, got {_kind(record)}; fix the line")
            records.append((where, record))
    return records


def read_json(path: Path) -> list[Located]:
    """A JSON list of records, an object holding one ({"data": [...]}) or columns ({"prompt": [...]})."""
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many ".json" files (the Hugging Face `datasets` convention) hold one record per line.
            return read_jsonl(path)
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file "
            "(it must hold one JSON list of records, or one record per line)"
        ) from None
    return _indexed(str(path), _records_in_json(doc, path))


def _records_in_json(doc: Any, path: Path) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        record_lists = [k for k, v in doc.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(record_lists) == 1:
            return doc[record_lists[0]]
        for key in RECORD_LIST_KEYS:
            if key in record_lists:
                return doc[key]
        lengths = {len(v) for v in doc.values() if isinstance(v, list)}
        if doc and len(lengths) == 1 and all(isinstance(v, list) for v in doc.values()):
            # Column-oriented ({"prompt": [...], "completion": [...]}), as pandas' to_dict("list") writes.
            return [dict(zip(doc, values, strict=True)) for values in zip(*doc.values(), strict=True)]
        raise DataError(
            f"{path}: found a JSON object with keys {sorted(doc)[:8]} but no list of records in it; "
            'write a list of records, or an object like {"data": [records]}'
        )
    raise DataError(f"{path}: expected a JSON list of records, got {_kind(doc)}; write a list of records")


def read_csv(path: Path, delimiter: str = ",") -> list[Located]:
    """A header row naming the fields, then one record per row (quoted fields may span lines)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    records: list[Located] = []
    try:
        header = next(reader, None)
        # A quoted field may make a record span several lines: track the line each record starts on.
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue  # blank line
            if len(row) == len(header):
                records.append((where, dict(zip(header, row, strict=True))))
            else:
                problem = f"expected {len(header)} fields ({delimiter.join(header)}), found {len(row)}"
                records.append((where, _bad(where, f"{problem}; quote fields that contain {delimiter!r}")))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({e}); fix the row") from None
    return records


def read_parquet(path: Path) -> list[Located]:
    """A Parquet table, one record per row (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e}); check the file") from None
    return _indexed(str(path), rows)


def read_object(obj: Any) -> list[Located]:
    """Records from a list of dicts, a datasets.Dataset (duck-typed), a DataFrame or an iterable of dicts."""
    name = _object_name(obj)
    if isinstance(obj, Mapping):
        raise DataError(f"{name}: got a mapping with keys {list(obj)[:8]}; pass one split, e.g. dataset['train']")
    if hasattr(obj, "to_list"):  # datasets.Dataset: one call instead of a slow per-row __getitem__
        items = obj.to_list()
    elif hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas.DataFrame
        items = obj.to_dict("records")
    elif hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        items = [obj[i] for i in range(len(obj))]
    elif hasattr(obj, "__iter__"):
        items = list(obj)
    else:
        raise DataError(f"cannot read records from a {type(obj).__name__}; pass a file path or a list of dicts")
    return _indexed(name, items)


def _indexed(name: str, items: list) -> list[Located]:
    """Locate records by 0-based index; an item that is not a dict becomes a DataError in its place."""
    located: list[Located] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, Mapping):
            located.append((where, dict(item)))
        else:
            located.append((where, _bad(where, f"expected a record (an object), got {_kind(item)}; fix the record")))
    return located


def _bad(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}, {SKIP_HINT}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _object_name(obj: Any) -> str:
    return "records" if isinstance(obj, (list, tuple)) else type(obj).__name__


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
