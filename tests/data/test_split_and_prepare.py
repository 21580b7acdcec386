"""Train/eval split (seeded fraction or a separate file) and the one-call prepare_data pipeline."""

from __future__ import annotations

import json

import pytest

from kbit.data import DataError, load_dataset, prepare_data, split_records

RECORDS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]


def test_split_is_deterministic_disjoint_and_sized():
    records = load_dataset(RECORDS)
    train, eval_ = split_records(records, 0.25, seed=7)
    again_train, again_eval = split_records(records, 0.25, seed=7)
    assert (len(train), len(eval_)) == (15, 5)
    assert train.rows == again_train.rows and eval_.rows == again_eval.rows
    assert sorted(train.where + eval_.where, key=lambda w: int(w[8:-1])) == records.where
    assert train.where == sorted(train.where, key=lambda w: int(w[8:-1]))  # file order kept on each side
    assert split_records(records, 0.25, seed=8)[1].where != eval_.where


def test_split_keeps_at_least_one_and_refuses_to_empty_train():
    assert len(split_records(load_dataset(RECORDS), 0.01)[1]) == 1
    with pytest.raises(DataError, match="too few to hold out 50% for eval"):
        split_records(load_dataset(RECORDS[:1]), 0.5)
    with pytest.raises(ValueError, match="eval_fraction must be between 0 and 1"):
        split_records(load_dataset(RECORDS), 1.0)


def test_prepare_data_with_eval_fraction_and_packing(tokenizer):
    train, eval_ = prepare_data(RECORDS, tokenizer, 128, eval_fraction=0.2, seed=1, pack=True)
    assert len(eval_.examples) == 4 and all(e.position_ids is None for e in eval_.examples)
    assert all(e.position_ids is not None for e in train.examples)
    unpacked, _ = prepare_data(RECORDS, tokenizer, 128, eval_fraction=0.2, seed=1)
    assert len(unpacked.examples) == 16 > len(train.examples)
    assert train.num_target_tokens == unpacked.num_target_tokens
    assert train.truncated == unpacked.truncated == 0


def test_prepare_data_with_a_separate_eval_file(tokenizer, data_file):
    path = data_file("eval.jsonl", "\n".join(json.dumps(r) for r in RECORDS[:3]))
    train, eval_ = prepare_data(RECORDS, tokenizer, 128, eval=path)
    assert (len(train.examples), len(eval_.examples)) == (20, 3)
    with pytest.raises(ValueError, match="either an eval source or an eval_fraction"):
        prepare_data(RECORDS, tokenizer, 128, eval=path, eval_fraction=0.1)
    assert prepare_data(RECORDS, tokenizer, 128)[1] is None
