"""Loss normalization: gradient accumulation over micro-batches equals one big batch, however uneven."""

from __future__ import annotations

import torch
from train_testing import synthetic_examples, train_config

from kbit.data import collate
from kbit.train import Trainer


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_four_micro_batches_of_one_equal_one_batch_of_four(make_model, tmp_path):
    model = make_model(bits=4)
    examples = synthetic_examples(4, seed=3, min_len=5, max_len=30)
    lengths = [len(e.input_ids) for e in examples]
    targets = [e.num_targets for e in examples]
    assert len(set(lengths)) == 4 and len(set(targets)) > 1  # uneven on purpose
    trainer = Trainer(model, None, examples, None, train_config(tmp_path))

    big = trainer.accumulate([collate(examples, pad_token_id=0)])
    big_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    small = trainer.accumulate([collate([e], pad_token_id=0) for e in examples])
    small_grads = lora_grads(model)

    # fp32 compute: the padded batch and the four unpadded ones differ only by summation order.
    torch.testing.assert_close(small, big, rtol=1e-6, atol=1e-6)
    assert small_grads.keys() == big_grads.keys() and len(big_grads) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    for name in big_grads:
        torch.testing.assert_close(small_grads[name], big_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # The bug this guards against: the mean of per-micro-batch means weights short sequences' tokens more.
    model.zero_grad(set_to_none=True)
    per_batch = [trainer.loss_sum(collate([e], 0)) for e in examples]
    mean_of_means = sum(s / n for s, n in per_batch) / len(per_batch)
    assert abs(mean_of_means.item() - big.item()) > 1e-3  # vs < 1e-6 between the two correct ways


def test_loss_only_at_target_positions_equals_full_logits(make_model, tmp_path):
    """logits_to_keep (the vocabulary projection only where a target is) changes no number."""
    model = make_model(bits=4)
    examples = synthetic_examples(3, seed=5)
    trainer = Trainer(model, None, examples, None, train_config(tmp_path))
    batch = collate(examples, pad_token_id=0)
    assert trainer.keep_logits
    kept, n_kept = trainer.loss_sum(batch)
    trainer.keep_logits = False
    full, n_full = trainer.loss_sum(batch)
    assert n_kept == n_full == sum(e.num_targets for e in examples)
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-5)
    # and it is the mean token cross-entropy transformers computes from labels
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(full.detach() / n_full, reference, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss(make_model, tmp_path):
    model = make_model(bits=4)
    result = Trainer(
        model,
        None,
        synthetic_examples(32),
        None,
        train_config(tmp_path, max_steps=20, learning_rate=1e-2, per_device_train_batch_size=4),
    ).train()
    assert len(result.losses) == 20
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.05


def test_gradient_checkpointing_changes_no_number(make_model, tmp_path):
    examples = synthetic_examples(4, seed=11)
    batch = [collate(examples, pad_token_id=0)]
    results = []
    for checkpointing in (False, True):
        model = make_model(bits=4)
        trainer = Trainer(model, None, examples, None, train_config(tmp_path, gradient_checkpointing=checkpointing))
        assert model.model.gradient_checkpointing is checkpointing
        results.append((trainer.accumulate(batch), lora_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_on_cpu(make_model, tmp_path):
    model = make_model(bits=4, dtype=torch.bfloat16)
    config = train_config(tmp_path, bf16=True, max_steps=8, learning_rate=1e-2, per_device_train_batch_size=4)
    trainer = Trainer(model, None, synthetic_examples(16), None, config)
    assert trainer.use_bf16 and trainer.mask_dtype == torch.bfloat16
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_fast_path_gives_the_same_losses_and_gradients(make_model, tmp_path):
    """fast_path: the fused kernels' reference path (chunked LM-head loss, no full logits) trains the same numbers."""
    examples = synthetic_examples(4, seed=7, min_len=5, max_len=30)
    batch = collate(examples, pad_token_id=0)
    runs = []
    for fast in (False, True):
        model = make_model(bits=4)
        trainer = Trainer(model, None, examples, None, train_config(tmp_path / str(fast), fast_path=fast))
        assert trainer.fused_loss is fast and ("chunked LM-head cross-entropy" in trainer.fast_path_line) is fast
        loss = trainer.accumulate([batch])
        runs.append((loss, lora_grads(model)))
    (slow, slow_grads), (fused, fused_grads) = runs
    torch.testing.assert_close(fused, slow, rtol=1e-6, atol=1e-6)
    for name in slow_grads:
        torch.testing.assert_close(fused_grads[name], slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)
