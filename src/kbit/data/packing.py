"""Packing: several short examples in one sequence of up to ``max_seq_len`` tokens, with no
cross-contamination.

Each packed sequence carries ``position_ids`` that restart at 0 where an example starts; the collator turns
them into a block-diagonal causal attention mask, so every token sees only earlier tokens of its own example
and the model computes exactly the per-example losses of the unpacked batch (tests/data/test_packing.py proves
it on a real transformers Llama). Labels need no change: every example's first label is already -100, so no
token is trained to predict the next example's first token.
"""

from __future__ import annotations

import bisect

from .encode import Example


def pack_examples(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Pack examples into sequences of at most ``max_seq_len`` tokens, grouped by :func:`pack_indices`."""
    for i, example in enumerate(examples):
        if example.position_ids is not None:
            raise ValueError(f"example {i} is already packed; pack unpacked examples once")
    groups = pack_indices([len(e.input_ids) for e in examples], max_seq_len)
    return [_concatenate([examples[i] for i in group]) for group in groups]


def pack_indices(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Group indices best-fit-decreasing so each group's lengths sum to at most ``max_seq_len``."""
    groups: list[list[int]] = []
    # (room left, group index), sorted: the best fit is the first entry with enough room.
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens > max_seq_len={max_seq_len}; truncate before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            groups.append([i])
            room, g = max_seq_len - n, len(groups) - 1
        else:
            room, g = free.pop(k)
            groups[g].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, g))
    return groups


def _concatenate(members: list[Example]) -> Example:
    input_ids, labels, position_ids = [], [], []
    for example in members:
        input_ids += example.input_ids
        labels += example.labels
        position_ids += range(len(example.input_ids))
    return Example(input_ids, labels, position_ids)
