"""Packing: groups fit, nothing is lost, and a real transformers Llama gives packed = unpacked per-example
losses."""

from __future__ import annotations

import random

import pytest
import torch

from kbit.data import IGNORE_INDEX, Example, collate, pack_examples, pack_indices

VOCAB, PAD = 128, 0


def random_examples(n: int, seed: int) -> list[Example]:
    """Synthetic examples: random ids, a masked prompt of random length, first label -100 (as encoded)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def test_pack_indices_best_fit_decreasing():
    assert pack_indices([6, 4, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack_indices([3, 3, 3], 10) == [[0, 1, 2]]
    assert pack_indices([10, 1], 10) == [[0], [1]]
    with pytest.raises(ValueError, match="example 1 has 11 tokens > max_seq_len=10; truncate before packing"):
        pack_indices([1, 11], 10)


def test_pack_examples_keeps_every_token_and_restarts_positions():
    examples = random_examples(40, seed=1)
    packed = pack_examples(examples, max_seq_len=48)
    assert all(len(p.input_ids) <= 48 for p in packed)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    assert sum(p.num_targets for p in packed) == sum(e.num_targets for e in examples)
    groups = pack_indices([len(e.input_ids) for e in examples], 48)
    assert sorted(i for g in groups for i in g) == list(range(40))
    for p, group in zip(packed, groups, strict=True):
        assert p.input_ids == [t for i in group for t in examples[i].input_ids]
        assert p.labels == [t for i in group for t in examples[i].labels]
        assert p.position_ids == [t for i in group for t in range(len(examples[i].input_ids))]
    # Best-fit keeps the sequences nearly full: 40 examples of ~11.5 tokens in rows of 48.
    assert len(packed) == -(-sum(len(e.input_ids) for e in examples) // 48)
    with pytest.raises(ValueError, match="already packed"):
        pack_examples(packed, 48)


def tiny_llama(attn_implementation: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current Llamas
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) loss of predicting labels[t] from position t-1 (0 where ignored), as transformers' LM loss."""
    # (B, T): the target that position t predicts.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return torch.nn.functional.pad(losses, (1, 0))[:, :-1]  # (B, T): loss for the label at t


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_losses_equal_unpacked_on_a_real_llama(attn_implementation):
    model = tiny_llama(attn_implementation)
    examples = random_examples(24, seed=2)
    # Unpacked reference: every example alone, no padding anywhere.
    reference = []
    for e in examples:
        ids = torch.tensor([e.input_ids])
        reference.append(token_losses(model(ids).logits, torch.tensor([e.labels]))[0].sum() / e.num_targets)
    reference = torch.stack(reference)

    max_seq_len = 48
    groups = pack_indices([len(e.input_ids) for e in examples], max_seq_len)
    batch = collate(pack_examples(examples, max_seq_len), PAD)
    assert batch.input_ids.shape[0] == len(groups) and batch.attention_mask.min() == 0  # rows are padded too
    out = model(**batch.model_inputs(torch.float32))
    losses = token_losses(out.logits, batch.labels)  # (B, T)
    packed = torch.empty(len(examples))
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            n = len(examples[i].input_ids)
            packed[i] = losses[row, start : start + n].sum() / examples[i].num_targets
            start += n
    # Same math on differently shaped tensors: fp32 rounding only.
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-5)
    # transformers' own loss is the mean over the batch's target tokens.
    total = sum(r * e.num_targets for r, e in zip(reference, examples, strict=True)) / batch.num_target_tokens
    torch.testing.assert_close(out.loss, total, rtol=0, atol=1e-5)

    # The test is not blind: without the block mask and position ids, examples see each other.
    leaky = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (token_losses(leaky, batch.labels).sum() - losses.sum()).abs() > 1e-2
