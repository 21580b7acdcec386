"""Out of memory inside a training step, in one process: the trainer's report (the 2-rank case is in test_two_ranks).

The failure is real: a forward hook on the last decoder layer asks torch's CPU allocator for 1 PiB, which it
refuses with its own RuntimeError, in the middle of the Trainer's real step on the real 4-bit + LoRA model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from dist_testing import build_model, run_config, save_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_testing import synthetic_examples  # noqa: E402

from kbit.dist import RankOutOfMemoryError  # noqa: E402
from kbit.estimate import estimate, load_config, model_shape  # noqa: E402
from kbit.train import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("oom") / "tiny"
    save_tiny_llama(path)
    return path


def trainer_failing_with(folder, tmp_path, fail, **overrides) -> Trainer:
    """A Trainer over the tiny model whose second decoder layer calls ``fail()`` after its forward."""
    model = build_model(folder)
    model.model.layers[1].register_forward_hook(lambda module, args, output: fail())
    return Trainer(model, None, synthetic_examples(8), None, run_config(tmp_path, "none", **overrides))


def test_allocator_failure_names_the_batch_and_the_estimate(folder, tmp_path):
    trainer = trainer_failing_with(folder, tmp_path, lambda: torch.empty(2**50, dtype=torch.uint8))
    with pytest.raises(RankOutOfMemoryError) as info:
        trainer.train()
    message = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError)  # callers that catch torch's error still do
    assert "DefaultCPUAllocator" in str(info.value.__cause__)
    # the step's two micro-batches of 2 (run_config), padded to their longest sequence
    longest = max(trainer.micro_batch(m).input_ids.shape[1] for m in (0, 1))
    assert message.startswith(
        f"the run on cpu ran out of memory in step 1: micro-batch of 2 x {longest} tokens (one of 2 accumulated "
        "per step), strategy none; kbit estimates "
    )
    est = estimate(model_shape(load_config(folder)), longest, 2, lora_r=4, gradient_checkpointing=False)
    assert f"kbit estimates {est.total / 2**30:.2f} GiB for this rank (weights {est.weights / 2**30:.2f}," in message
    tips = message.split("; try ")[1]
    assert tips.startswith("activation checkpointing (memory_plan: full") and "strategy fsdp" in tips
    assert "cpu_offload" not in tips  # nothing to offload to on a CPU run
    assert "\n" not in message


def test_cuda_message_keeps_the_failed_allocation_and_other_errors_pass(folder, tmp_path):
    def cuda_oom():  # the text torch's CUDA allocator raises (no GPU here: the class and message are torch's)
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.50 GiB is free. Of the allocated memory 75.10 GiB is allocated by PyTorch"
        )

    trainer = trainer_failing_with(folder, tmp_path / "a", cuda_oom, gradient_checkpointing=True)
    with pytest.raises(RankOutOfMemoryError, match=r"; torch: Tried to allocate 2\.00 GiB; try memory_plan: memory"):
        trainer.train()

    def other():
        raise RuntimeError("shape mismatch somewhere")

    with pytest.raises(RuntimeError, match="^shape mismatch somewhere$") as info:
        trainer_failing_with(folder, tmp_path / "b", other).train()
    assert not isinstance(info.value, RankOutOfMemoryError)
