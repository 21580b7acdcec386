"""Every bad-data case raises one DataError line naming file:line (or file[index]), the field and what to do;
skip_bad_records=True skips the skippable ones and counts them."""

from __future__ import annotations

import json

import pytest

from kbit.data import DataError, load_dataset, tokenize_records

GOOD = json.dumps({"prompt": "2+2?", "completion": "4"})


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "messages are one line"
    assert isinstance(info.value, ValueError)
    return message


def test_malformed_json_line(data_file):
    path = data_file("d.jsonl", f'{GOOD}\n{GOOD}\n{{"prompt": "x", "completion": }}\n{GOOD}\n')
    message = error_of(load_dataset, path)
    assert message.startswith(f"{path}:3: malformed JSON (Expecting value at column 31); fix the line")
    assert "skip_bad_records=True" in message
    records = load_dataset(path, skip_bad_records=True)
    assert (len(records), records.skipped) == (3, 1)
    assert records.where == [f"{path}:1", f"{path}:2", f"{path}:4"]


def test_jsonl_line_that_is_not_an_object(data_file):
    path = data_file("d.jsonl", f"{GOOD}\n[1, 2]\n")
    assert error_of(load_dataset, path) == (
        f"{path}:2: expected a JSON object per line, got list; fix the line, "
        "or pass skip_bad_records=True to skip such records"
    )


def test_missing_field_names_line_and_field(data_file):
    path = data_file("d.jsonl", f'{GOOD}\n{{"prompt": "3+3?"}}\n{GOOD}\n')
    message = error_of(load_dataset, path)
    assert message.startswith(
        f"{path}:2: field 'completion' is missing "
        "(format 'prompt_completion' needs 'prompt' and 'completion'); "
        "fix the record, or pass skip_bad_records=True"
    )
    records = load_dataset(path, skip_bad_records=True)
    assert (len(records), records.skipped) == (2, 1)


def test_first_record_bad_is_reported_by_field_not_as_unknown_format(data_file):
    path = data_file("d.jsonl", f'{{"prompt": "3+3?"}}\n{GOOD}\n')
    assert error_of(load_dataset, path).startswith(f"{path}:1: field 'completion' is missing")


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"prompt": "p", "completion": ""}, "completion", "must be a non-empty string, got ''"),
        ({"prompt": "p", "completion": None}, "completion", "must be a non-empty string, got None"),
        ({"messages": []}, "messages", "must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "has no assistant message"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "messages[0].content", "must be a string"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "must be a string"),
        ({"messages": "[not json"}, "messages", "is text but not a JSON message list"),
    ],
)
def test_bad_field_values(record, field, problem):
    message = error_of(load_dataset, [record])
    assert message.startswith(f"records[0]: field '{field}' {problem}")
    assert message.endswith("skip_bad_records=True to skip such records")


def test_json_record_index_and_skip(data_file):
    path = data_file("d.json", json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c"}, "oops"]))
    assert error_of(load_dataset, path).startswith(f"{path}[1]: field 'completion' is missing")
    assert error_of(load_dataset, path, format="text").startswith(f"{path}[0]: field 'text' is missing")
    records = load_dataset(path, skip_bad_records=True)
    assert (len(records), records.skipped) == (1, 2)


def test_malformed_json_file_names_the_line(data_file):
    path = data_file("d.json", '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n]')
    assert error_of(load_dataset, path).startswith(f"{path}:4: malformed JSON (Expecting property name")


def test_csv_row_with_wrong_field_count(data_file):
    path = data_file("d.csv", "prompt,completion\na,b\nc,d,e\nf,g\n")
    message = error_of(load_dataset, path)
    assert message.startswith(f"{path}:3: expected 2 fields (prompt,completion), found 3; quote fields that contain")
    records = load_dataset(path, skip_bad_records=True)
    assert (len(records), records.skipped, records.where) == (2, 1, [f"{path}:2", f"{path}:4"])


def test_csv_missing_column_names_the_field(data_file):
    path = data_file("d.csv", "prompt,answer\na,b\n")
    # The format is undetectable from (prompt, answer): the message names the fields and the accepted shapes.
    message = error_of(load_dataset, path)
    assert message.startswith(f"{path}:2: cannot tell the data format from the fields ['answer', 'prompt']")
    assert "prompt+completion" in message


EMPTY = [
    ("d.jsonl", ""),
    ("d.jsonl", "\n\n"),
    ("d.json", ""),
    ("d.json", "[]"),
    ("d.csv", ""),
    ("d.csv", "a,b\n"),
]


@pytest.mark.parametrize("name, text", EMPTY)
def test_empty_file(data_file, name, text):
    path = data_file(name, text)
    assert error_of(load_dataset, path) == (
        f"{path}: no data (it holds no records); give a file with at least one record"
    )


def test_all_records_bad_and_skipped(data_file):
    path = data_file("d.jsonl", '{"prompt": "a"}\n[]\n')
    assert error_of(load_dataset, path, "prompt_completion", skip_bad_records=True) == (
        f"{path}: no valid record (2 bad records skipped); fix the data"
    )
    assert error_of(load_dataset, data_file("e.jsonl", "[]\n{\n"), skip_bad_records=True) == (
        f"{path.parent / 'e.jsonl'}: no valid record (2 bad records skipped); fix the data"
    )


def test_not_utf8_names_the_line(data_file):
    path = data_file("d.jsonl", GOOD.encode() + b"\n" + b'{"prompt": "\xff", "completion": "x"}\n')
    assert error_of(load_dataset, path).startswith(f"{path}:2: not UTF-8 text")
    assert len(load_dataset(path, skip_bad_records=True)) == 1


def test_all_records_longer_than_max_seq_len(data_file, tokenizer):
    path = data_file("d.jsonl", f"{GOOD}\n{GOOD}\n")
    records = load_dataset(path)
    message = error_of(tokenize_records, records, tokenizer, max_seq_len=8)
    assert message.startswith(
        f"{path}: all 2 records have no 'completion' token within max_seq_len=8 (first: {path}:1, "
    )
    assert message.endswith("raise max_seq_len or shorten the records")
