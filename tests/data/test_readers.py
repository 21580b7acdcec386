"""Each reader (JSONL, JSON shapes, CSV/TSV, Parquet, in-memory datasets); format detection, normalization."""

from __future__ import annotations

import json
import sys

import pytest

from kbit.data import DataError, load_dataset

PC = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]
PC_MESSAGES = [
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(data_file):
    path = data_file("d.jsonl", "\n".join([json.dumps(PC[0]), "", json.dumps(PC[1]), ""]))
    records = load_dataset(path)
    assert records.format == "prompt_completion"
    assert records.rows == PC_MESSAGES
    assert records.where == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize(
    "doc",
    [
        PC,
        {"data": PC},
        {"version": 2, "train": PC},
        {"meta": [{"a": 1}], "examples": PC},  # two record lists: the conventional key wins
        {"prompt": ["2+2?", "3+3?"], "completion": ["4", "6"]},  # column-oriented
    ],
    ids=["list", "data", "train", "examples", "columns"],
)
def test_json_shapes(data_file, doc):
    path = data_file("d.json", json.dumps(doc, indent=1))
    records = load_dataset(path)
    assert records.rows == PC_MESSAGES
    assert records.where == [f"{path}[0]", f"{path}[1]"]


def test_json_file_with_one_record_per_line_is_read_as_jsonl(data_file):
    path = data_file("d.json", "\n".join(json.dumps(r) for r in PC))
    records = load_dataset(path)
    assert records.rows == PC_MESSAGES
    assert records.where == [f"{path}:1", f"{path}:2"]


def test_csv_with_multiline_field_reports_starting_lines(data_file):
    path = data_file("d.csv", 'question,answer\n"What is\ntwo plus two?",4\nWhat is 3+3?,6\n')
    records = load_dataset(path)
    assert records.format == "question_answer"
    assert records.rows[0]["messages"][0]["content"] == "What is\ntwo plus two?"
    assert records.rows[1]["messages"][1]["content"] == "6"
    assert records.where == [f"{path}:2", f"{path}:4"]


def test_tsv_and_messages_as_json_text(data_file):
    messages = json.dumps(PC_MESSAGES[0]["messages"])
    path = data_file("d.tsv", f"messages\n{messages}\n")
    records = load_dataset(path)
    assert records.format == "messages"
    assert records.rows == PC_MESSAGES[:1]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(PC), path)
    records = load_dataset(path)
    assert records.rows == PC_MESSAGES
    assert records.where == [f"{path}[0]", f"{path}[1]"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    # None in sys.modules makes `import pyarrow.parquet` fail as if pyarrow were not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_dataset(path)


class ListBacked:
    """Duck-types `datasets.Dataset`: rows through to_list()."""

    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


class Indexable:
    """Only __len__ and __getitem__, like a torch Dataset."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize(
    "source, name",
    [
        (PC, "records"),
        (ListBacked(PC), "ListBacked"),
        (Indexable(PC), "Indexable"),
        (iter(PC), "list_iterator"),
    ],
    ids=["list", "to_list", "getitem", "iterator"],
)
def test_in_memory_sources(source, name):
    records = load_dataset(source)
    assert records.rows == PC_MESSAGES
    assert records.where == [f"{name}[0]", f"{name}[1]"]
    assert records.source == name


def test_dataset_dict_asks_for_a_split():
    with pytest.raises(DataError, match=r"pass one split, e.g. dataset\['train'\]"):
        load_dataset({"train": ListBacked(PC)})


@pytest.mark.parametrize(
    "record, format, user, answer",
    [
        ({"prompt": "p", "completion": "c"}, "prompt_completion", "p", "c"),
        ({"question": "q", "answer": 42}, "question_answer", "q", "42"),
        ({"instruction": "Add.", "input": "2 2", "output": "4"}, "alpaca", "Add.\n\n2 2", "4"),
        ({"instruction": "Say hi.", "input": " ", "output": "hi"}, "alpaca", "Say hi.", "hi"),
        ({"instruction": "Say hi.", "output": "hi"}, "alpaca", "Say hi.", "hi"),
    ],
)
def test_detect_and_normalize_flat_formats(record, format, user, answer):
    records = load_dataset([record])
    assert records.format == format
    assert records.rows == [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}]


def test_messages_keep_roles_and_drop_extra_keys():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi", "name": "bob"},
        {"role": "assistant", "content": "Hello"},
    ]
    records = load_dataset([{"messages": messages, "id": 7}])
    assert records.format == "messages"
    assert records.rows[0]["messages"][1] == {"role": "user", "content": "Hi"}
    assert [m["role"] for m in records.rows[0]["messages"]] == ["system", "user", "assistant"]


def test_conversational_prompt_completion():
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Yo"}],
    }
    assert load_dataset([record]).rows[0]["messages"] == record["prompt"] + record["completion"]


def test_text_format_and_priority():
    assert load_dataset([{"text": "hello"}]).rows == [{"text": "hello"}]
    # A record with several shapes' fields is read as the first shape in priority order.
    both = {"text": "t", "prompt": "p", "completion": "c"}
    assert load_dataset([both]).format == "prompt_completion"
    assert load_dataset([both], format="text").rows == [{"text": "t"}]


def test_named_format_that_does_not_fit_errors():
    with pytest.raises(DataError, match=r"^records\[0\]: field 'question' is missing \(format 'question_answer'"):
        load_dataset(PC, format="question_answer")


def test_unknown_format_name():
    with pytest.raises(ValueError, match="unknown data format 'chatml'"):
        load_dataset(PC, format="chatml")


def test_undetectable_format_names_the_fields():
    with pytest.raises(DataError, match=r"^records\[0\]: cannot tell the data format from the fields \['a', 'b'\]"):
        load_dataset([{"a": 1, "b": 2}])


def test_unknown_suffix_and_missing_file(data_file, tmp_path):
    with pytest.raises(DataError, match=r"unknown data file type '\.txt'; use \.jsonl"):
        load_dataset(data_file("d.txt", "hello"))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_dataset(tmp_path / "nope.jsonl")
