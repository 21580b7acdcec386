"""A training step captured in a CUDA graph (kbit.train.cuda_graph) trains exactly as the same steps run eagerly."""

from __future__ import annotations

import copy

import pytest
import torch
from kbit_testing import tiny_llama
from torch import nn

from kbit.lora import add_lora, lora_layers
from kbit.models.checkpointing import set_checkpointing
from kbit.models.patch import apply_fast_path
from kbit.nn import Linear4bit
from kbit.train.cuda_graph import GraphedStep, check_graphable


def qlora(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny Llama with every decoder projection in NF4 and LoRA r=4 on all of them (nonzero B), fast path on."""
    m = tiny_llama()
    for path, module in list(m.named_modules()):
        if type(module) is nn.Linear and path != "lm_head":
            parent, _, name = path.rpartition(".")
            setattr(m.get_submodule(parent), name, Linear4bit.from_linear(module, compute_dtype=dtype))
    m = m.to(device, dtype)
    add_lora(m, r=4, alpha=8, dropout=0.0, dtype=dtype)
    torch.manual_seed(1)
    for _, layer in lora_layers(m):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    apply_fast_path(m)
    return m.train()


def test_refuses_offload_and_a_non_capturable_optimizer():
    m = qlora("cpu")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    set_checkpointing(m, "offload")
    with pytest.raises(ValueError, match="offloaded activations wait on their copies"):
        check_graphable(m, opt)
    set_checkpointing(m, "full")
    with pytest.raises(ValueError, match="must be built with capturable=True"):
        check_graphable(m, opt)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], capturable=True)
    with pytest.raises(ValueError, match="not on a CUDA device"):
        check_graphable(m, opt)


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["none", "full"])
def test_graphed_steps_train_as_eager_steps(plan):
    eager = qlora("cuda")
    set_checkpointing(eager, plan)
    graphed_model = copy.deepcopy(eager)
    models = (eager, graphed_model)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, capturable=True)
            for m in models]  # fmt: skip
    check_graphable(graphed_model, opts[1])

    def step(m, opt, batch):
        loss = m(input_ids=batch["ids"], labels=batch["ids"], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    graphed = GraphedStep(lambda b: step(graphed_model, opts[1], b), warmup=2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses = []
    for _ in range(6):  # 2 eager warm-ups, the capture (replayed at once), 3 replays
        batch = {"ids": torch.randint(0, 256, (2, 24), device="cuda", generator=gen)}
        losses.append((step(eager, opts[0], batch).item(), graphed.step(batch).item()))
    assert graphed.graph is not None
    for want, got in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len({w for w, _ in losses}) == 6  # the parameters moved: every step saw a new model
    for (_, a), (_, b) in zip(lora_layers(eager), lora_layers(graphed_model), strict=True):
        torch.testing.assert_close(b.lora_A.weight, a.lora_A.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.lora_B.weight, a.lora_B.weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pad or pack every batch to one shape"):
        graphed.step({"ids": torch.zeros(2, 25, dtype=torch.long, device="cuda")})
