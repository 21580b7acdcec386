"""The trainer's memory_plan key: each plan is applied to the decoder layers, logged, and trains the same numbers."""

from __future__ import annotations

import pytest
import torch
from train_testing import synthetic_examples, train_config

from kbit.data import collate
from kbit.models.checkpointing import decoder_layers
from kbit.train import Trainer
from kbit.train.config import ConfigError


def test_each_plan_is_applied_and_changes_no_number(make_model, tmp_path):
    examples = synthetic_examples(4, seed=11)
    batch = [collate(examples, pad_token_id=0)]
    results = {}
    for plan in ("none", "full", "offload", "selective", "memory", "speed"):
        model = make_model(bits=4, dropout=0.1)
        trainer = Trainer(model, None, examples, None, train_config(tmp_path, memory_plan=plan))
        recomputed = {"none": False, "speed": False}.get(plan, True)  # speed on a CPU keeps every layer
        assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [recomputed] * 2
        assert trainer.gradient_checkpointing is recomputed
        assert trainer.memory_plan.line.startswith("memory plan: ")
        torch.manual_seed(3)  # the same LoRA dropout masks in every run
        loss = trainer.accumulate(batch)
        results[plan] = (loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    loss0, grads0 = results["none"]
    for plan, (loss, grads) in results.items():  # fp32: recomputation replays the same ops and dropout masks
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0, msg=plan)
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=f"{plan}: {name}")


def test_plan_line_is_in_the_start_up_header(make_model, tmp_path, capsys):
    trainer = Trainer(
        make_model(), None, synthetic_examples(4), None, train_config(tmp_path, memory_plan="offload", max_steps=1)
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "memory plan: offload on all 2 layers, as configured\n" in out


def test_the_plan_line_says_where_an_auto_plan_came_from(make_model, tmp_path):
    cases = {None: "memory_plan auto on CPU", True: "from gradient_checkpointing: true"}
    for checkpointing, why in cases.items():
        config = train_config(tmp_path, memory_plan="auto", gradient_checkpointing=checkpointing)
        trainer = Trainer(make_model(), None, synthetic_examples(4), None, config)
        mode = "full" if checkpointing else "none"
        assert trainer.memory_plan.line == f"memory plan: {mode} on all 2 layers, {why}"


def _short_of_memory(model) -> None:
    """Make the last decoder layer fail as a GPU out of memory does whenever it keeps its activations (after the
    first layer has drawn its dropout masks, so a retry must rewind the RNG)."""

    def no_room(layer, args):
        if not layer.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    decoder_layers(model)[-1].register_forward_pre_hook(no_room)


def test_a_speed_plan_out_of_memory_retries_with_every_layer_recomputed(make_model, tmp_path, capsys):
    """The step is replayed from the same RNG state (same dropout masks), so the run's losses are those of a run
    planned 'full' from the start."""
    examples = synthetic_examples(8, seed=5)
    losses = {}
    for plan in ("speed", "full"):
        model = make_model(bits=4, dropout=0.1)
        _short_of_memory(model)
        trainer = Trainer(model, None, examples, None, train_config(tmp_path / plan, memory_plan=plan, max_steps=3))
        assert trainer.memory_plan.modes == (("none", "none") if plan == "speed" else ("full", "full"))
        losses[plan] = trainer.train().losses
        assert trainer.memory_plan.modes == ("full", "full")
    assert losses["speed"] == losses["full"] and len(losses["speed"]) == 3
    out = capsys.readouterr().out
    assert "memory plan: out of memory in step 1 with 2 layers kept; recomputing every layer from now on" in out


def test_a_plan_set_by_hand_is_not_changed_on_out_of_memory(make_model, tmp_path):
    from kbit.dist import RankOutOfMemoryError

    model = make_model()
    _short_of_memory(model)
    trainer = Trainer(model, None, synthetic_examples(4), None, train_config(tmp_path, memory_plan="none"))
    with pytest.raises(RankOutOfMemoryError, match="ran out of memory in step 1"):
        trainer.train()


def test_a_model_without_decoder_layers_fails_naming_the_key(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="^memory_plan: memory plan full: Bare has no transformers decoder layers"):
        Trainer(Bare(), None, synthetic_examples(2), None, train_config(tmp_path, memory_plan="full"))


@pytest.mark.gpu
def test_cuda_default_is_the_speed_plan_and_memory_trains_the_same(tiny_llama_dir, tmp_path):
    """On CUDA the default plans from free memory (a tiny model keeps every layer); memory offloads every layer's
    input and its losses track the kept run's (bf16, the same fused kernels replayed)."""
    from kbit.lora import add_lora
    from kbit.models.load import load_model

    runs = {}
    for plan in ("auto", "memory"):
        torch.manual_seed(0)
        model = load_model(tiny_llama_dir, bits=4, compute_dtype=torch.bfloat16, device="cuda")
        add_lora(model, r=4, alpha=8, dropout=0.0)
        config = train_config(tmp_path / plan, memory_plan=plan, max_steps=4, per_device_train_batch_size=4)
        trainer = Trainer(model, None, synthetic_examples(16), None, config)
        runs[plan] = (trainer.memory_plan, trainer.train().losses)
    assert runs["auto"][0].modes == ("none", "none")
    assert runs["auto"][0].line.startswith("memory plan: 2 layers kept (free ")
    assert runs["memory"][0].modes == ("offload", "offload")
    torch.testing.assert_close(torch.tensor(runs["memory"][1]), torch.tensor(runs["auto"][1]), rtol=1e-2, atol=1e-2)
