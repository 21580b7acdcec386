"""Collation: padding values, target-token counts, the packed 4-D mask, batch iteration."""

from __future__ import annotations

import pytest
import torch

from kbit.data import IGNORE_INDEX, Example, block_causal_mask, collate, iterate_batches, pack_examples

PAD = 0
A = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
B = Example([8, 9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 11, 12])


def test_pads_to_the_longest_with_pad_id_ignored_labels_and_zero_mask():
    batch = collate([A, B], PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, PAD, PAD], [8, 9, 10, 11, 12]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], B.labels]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.position_ids is None
    assert batch.num_target_tokens == 4
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.labels, batch.attention_mask))
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask", "labels"}


def test_pad_to_multiple_of():
    assert collate([A, B], PAD, pad_to_multiple_of=8).input_ids.shape == (2, 8)


def test_packed_batch_has_position_ids_and_a_block_causal_mask():
    [packed] = pack_examples([A, B], max_seq_len=8)  # B first (longest first), then A
    batch = collate([packed, Example([1, 2], [IGNORE_INDEX, 2], [0, 1])], PAD)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.num_target_tokens == 5
    inputs = batch.model_inputs(torch.bfloat16)
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bfloat16
    allowed = (mask[:, 0] == 0).int()
    # Row 0: B (positions 0-4) and A (5-7) each causal, no attention across them.
    expected = torch.zeros(8, 8, dtype=torch.int)
    expected[:5, :5] = torch.ones(5, 5).tril()
    expected[5:, 5:] = torch.ones(3, 3).tril()
    assert torch.equal(allowed[0], expected)
    # Row 1: a 2-token example, then six padding tokens that each see only themselves.
    expected = torch.eye(8, dtype=torch.int)
    expected[:2, :2] = torch.ones(2, 2).tril()
    assert torch.equal(allowed[1], expected)
    assert (mask[mask != 0] == torch.finfo(torch.bfloat16).min).all()
    assert torch.equal(inputs["position_ids"], batch.position_ids)


def test_block_causal_mask_of_one_unpacked_row_is_plain_causal():
    mask = block_causal_mask(torch.arange(4)[None])
    assert torch.equal(mask[0, 0] == 0, torch.ones(4, 4, dtype=torch.bool).tril())


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([], PAD)
    with pytest.raises(ValueError, match="cannot mix packed and unpacked"):
        collate([A, Example([1, 2], [IGNORE_INDEX, 2], [0, 1])], PAD)


def test_iterate_batches_is_a_seeded_permutation():
    examples = [Example([i, i + 1], [IGNORE_INDEX, i + 1]) for i in range(1, 11)]
    first = [b.input_ids[:, 0].tolist() for b in iterate_batches(examples, 4, PAD, seed=3)]
    again = [b.input_ids[:, 0].tolist() for b in iterate_batches(examples, 4, PAD, seed=3)]
    other = [b.input_ids[:, 0].tolist() for b in iterate_batches(examples, 4, PAD, seed=4)]
    assert first == again != other
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(1, 11))
    in_order = [b.input_ids[:, 0].tolist() for b in iterate_batches(examples, 4, PAD, shuffle=False)]
    assert in_order == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_to_moves_every_tensor():
    [packed] = pack_examples([A, B], max_seq_len=8)
    batch = collate([packed], PAD).to("cpu")
    assert batch.position_ids.device.type == "cpu" and batch.num_target_tokens == 4
