"""The built-in date-to-ISO task: deterministic, correct answers, disjoint splits, short examples,
check_answer."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from kbit.data import IGNORE_INDEX, builtin_dataset, check_answer, tokenize_records
from kbit.data.builtin import MONTHS


def test_deterministic_per_seed_and_split():
    assert builtin_dataset("train", n=50, seed=0) == builtin_dataset("train", n=50, seed=0)
    assert builtin_dataset("train", n=50, seed=0) != builtin_dataset("train", n=50, seed=1)
    assert builtin_dataset("train", n=20) == builtin_dataset("train", n=50)[:20]  # a prefix of a longer draw
    # Golden values pin the generator across Python versions and refactors.
    assert builtin_dataset("eval", n=2, seed=0) == [
        {"messages": [{"role": "user", "content": "Convert to YYYY-MM-DD: 12th June 2028"},
                      {"role": "assistant", "content": "2028-06-12"}]},
        {"messages": [{"role": "user", "content": "Write February 23, 2028 as an ISO date."},
                      {"role": "assistant", "content": "2028-02-23"}]},
    ]  # fmt: skip


def test_default_sizes_and_disjoint_splits():
    train, eval_ = builtin_dataset("train"), builtin_dataset("eval")
    assert (len(train), len(eval_)) == (800, 100)

    def answers(records):
        return {r["messages"][1]["content"] for r in records}

    assert len(answers(train)) == 800 and len(answers(eval_)) == 100  # no repeated date within a split
    assert not answers(train) & answers(builtin_dataset("eval", n=1000, seed=5))


def test_answers_are_the_dates_in_the_questions():
    for record in builtin_dataset("train", n=300, seed=3):
        question, answer = (m["content"] for m in record["messages"])
        date = dt.date.fromisoformat(answer)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
        assert str(date.year) in question and str(date.day) in question
        assert MONTHS[date.month - 1][:3] in question


def test_check_answer_is_exact_up_to_whitespace_and_case():
    record = builtin_dataset("eval", n=1)[0]
    answer = record["messages"][1]["content"]
    assert check_answer(record, answer)
    assert check_answer(record, f"  {answer}\n")
    assert not check_answer(record, f"The date is {answer}.")
    assert not check_answer(record, answer.replace("-", "/"))
    assert not check_answer(record, "")


def test_examples_are_short_and_supervise_exactly_the_answer(tokenizer):
    records = builtin_dataset("train", n=400) + builtin_dataset("eval", n=100)
    data = tokenize_records(records, tokenizer, max_seq_len=64)
    assert (data.truncated, data.dropped) == (0, 0)
    assert max(len(e.input_ids) for e in data.examples) < 64
    for record, example in zip(records, data.examples, strict=True):
        labels = example.labels
        supervised = [t for t, label in zip(example.input_ids, labels, strict=True) if label != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == record["messages"][1]["content"] + "<|im_end|>"


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        builtin_dataset("test")
    with pytest.raises(ValueError, match="n must be between 0 and"):
        builtin_dataset("eval", n=10**6)
