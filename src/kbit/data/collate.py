"""Collation: pad examples into a batch of tensors, and build the model's keyword arguments for it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .encode import IGNORE_INDEX, Example


@dataclass
class Batch:
    """A right-padded batch; ``position_ids`` is set only for packed batches."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, -100 on prompt, padding and each example's first token
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens, 0 on padding
    position_ids: torch.Tensor | None  # (B, T) int64, restarting at 0 at each packed example; 0 on padding
    num_target_tokens: int  # tokens that contribute to the loss: normalize accumulated losses by their sum

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers causal LM; a packed batch gets position_ids and a 4-D
        block-diagonal causal mask in ``dtype`` (the model's compute dtype) in place of the padding mask."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": block_causal_mask(self.position_ids, dtype),
            "labels": self.labels,
        }

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        position_ids = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            position_ids,
            self.num_target_tokens,
        )


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: 0 where query t may attend key s (s <= t, same example), else dtype min.

    Examples are told apart by ``position_ids`` restarting at 0. Padding has position 0, so each padding token
    is an example of its own that attends only to itself (no all-masked row, hence no NaN) and is seen by no
    one. Transformers uses a 4-D mask as given, for eager and SDPA attention alike; it must be additive and in
    the model's dtype because eager attention adds it to the scores.
    """
    segment = (position_ids == 0).cumsum(-1)  # (B, T): index of the example each token belongs to
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T query, T key)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def collate(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad ``examples`` to the longest (rounded up to ``pad_to_multiple_of``) into one Batch."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    packed = examples[0].position_ids is not None
    if any((e.position_ids is not None) != packed for e in examples):
        raise ValueError("cannot mix packed and unpacked examples in one batch")
    longest = max(len(e.input_ids) for e in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
        if packed:
            position_ids[row, :n] = torch.tensor(example.position_ids)
    num_target_tokens = int((labels != IGNORE_INDEX).sum())
    return Batch(input_ids, labels, attention_mask, position_ids, num_target_tokens)


def iterate_batches(
    examples: list[Example], batch_size: int, pad_token_id: int, *, shuffle: bool = True, seed: int = 0
) -> Iterator[Batch]:
    """One epoch of batches; with ``shuffle`` the order is a seeded permutation (vary the seed per epoch)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
