"""A kbit 4-bit model with kbit LoRA trains in transformers' Trainer and TRL's SFTTrainer (one CPU step)."""

from __future__ import annotations

import pytest
import torch

from kbit.nn import Linear4bit


def lora_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_trained(model, before, loss):
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    after = lora_snapshot(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all("lora_" in n for n in changed)
    # the frozen 4-bit weights stayed packed and frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


TEXTS = [
    "the date is 2021-03-05.",
    "convert May 1, 1999 to 1999-05-01.",
    "hello world, says the model!",
    "QLoRA trains LoRA on a 4-bit base.",
] * 2


def test_transformers_trainer_one_step(make_model, char_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = make_model(bits=4)
    data = Dataset.from_dict({"text": TEXTS}).map(
        lambda b: char_tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(char_tokenizer, mlm=False),
    )
    before = lora_snapshot(model)
    result = trainer.train()
    check_trained(model, before, result.training_loss)


def test_trl_sft_trainer_one_step(make_model, char_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = make_model(bits=4)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_length=64,
        dataset_text_field="text",
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer,
    )
    before = lora_snapshot(model)
    result = trainer.train()
    check_trained(model, before, result.training_loss)
