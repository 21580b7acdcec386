"""A training step's forward and backward captured in a CUDA graph (kbit.train.cuda_graph) computes exactly what the
same steps run eagerly compute, with every memory plan (offloaded inputs and a host-memory embedding included)."""

from __future__ import annotations

import copy

import pytest
import torch
from kbit_testing import tiny_llama
from torch import nn

from kbit.lora import add_lora, lora_layers
from kbit.models.checkpointing import set_checkpointing
from kbit.models.offload import offload_input_embeddings
from kbit.models.patch import apply_fast_path, mlp_chunking
from kbit.nn import Linear4bit
from kbit.optim import build_optimizer
from kbit.train.cuda_graph import GraphedStep, check_graphable


def qlora(device: str, dtype: torch.dtype = torch.float32, dropout: float = 0.0, **config) -> nn.Module:
    """A tiny Llama with every decoder projection in NF4 and LoRA r=4 on all of them (nonzero B), fast path on."""
    m = tiny_llama(**config)
    for path, module in list(m.named_modules()):
        if type(module) is nn.Linear and path != "lm_head":
            parent, _, name = path.rpartition(".")
            setattr(m.get_submodule(parent), name, Linear4bit.from_linear(module, compute_dtype=dtype))
    m = m.to(device, dtype)
    add_lora(m, r=4, alpha=8, dropout=dropout, dtype=dtype)
    torch.manual_seed(1)
    for _, layer in lora_layers(m):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    apply_fast_path(m)
    return m.train()


def test_refuses_dropout_a_cpu_lookup_and_cpu_parameters():
    with pytest.raises(ValueError, match=r"q_proj\.lora_dropout drops out with p=0\.1.*set dropout"):
        check_graphable(qlora("cpu", dropout=0.1))
    m = qlora("cpu", tie_word_embeddings=False)
    offload_input_embeddings(m)  # a CPU model: the rows are looked up on the CPU
    with pytest.raises(ValueError, match=r"the input embedding \(Embedding\) is looked up on the CPU"):
        check_graphable(m)
    with pytest.raises(ValueError, match="not on a CUDA device"):
        check_graphable(qlora("cpu"))
    with pytest.raises(ValueError, match="not on a CUDA device"):  # not dropout: it is off outside training
        check_graphable(qlora("cpu", dropout=0.1).eval())


def _forward_backward(m: nn.Module, batch: dict) -> torch.Tensor:
    loss = m(input_ids=batch["ids"], labels=batch["ids"], use_cache=False).loss
    loss.backward()
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "plan, host_embedding, optim, pieces, packed",
    [
        ("none", False, "adamw", None, True),
        ("full", False, "adamw", None, False),  # rows of one sequence: the captured attention builds no mask
        ("offload", True, "adamw", None, False),  # plan "memory": inputs and the embedding table in host memory
        # + the MLP in pieces of 8 tokens, its weights in row pieces of 16, 8-bit paged state outside
        ("offload", True, "paged_adamw_8bit", 8, False),
    ],
)
def test_graphed_steps_train_as_eager_steps(plan, host_embedding, optim, pieces, packed):
    eager = qlora("cuda", tie_word_embeddings=False)
    set_checkpointing(eager, plan)
    for m in eager.modules():
        if isinstance(m, Linear4bit) and pieces:
            m.dequant_rows = 16
    graphed_model = copy.deepcopy(eager)
    models = (eager, graphed_model)
    if host_embedding:
        for m in models:
            assert "moved to CPU memory" in offload_input_embeddings(m)
    opts = [build_optimizer(optim, [p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    check_graphable(graphed_model)
    params = [p for p in graphed_model.parameters() if p.requires_grad]
    graphed = GraphedStep(lambda b: _forward_backward(graphed_model, b), params, warmup=2, packed=packed)
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses = []
    with mlp_chunking(eager, pieces), mlp_chunking(graphed_model, pieces):
        for _ in range(6):  # 2 eager warm-ups, the capture (replayed at once), 3 replays
            batch = {"ids": torch.randint(0, 256, (2, 24), device="cuda", generator=gen)}
            want = _forward_backward(eager, batch).item()
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
            got = graphed.step(batch).item()
            opts[1].step()  # no zero_grad: each replay writes fresh gradients
            losses.append((want, got))
    assert graphed.graph is not None
    for want, got in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len({w for w, _ in losses}) == 6  # the parameters moved: every step saw a new model
    for (_, a), (_, b) in zip(lora_layers(eager), lora_layers(graphed_model), strict=True):
        torch.testing.assert_close(b.lora_A.weight, a.lora_A.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.lora_B.weight, a.lora_B.weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pad or pack every batch to one shape"):
        graphed.step({"ids": torch.zeros(2, 25, dtype=torch.long, device="cuda")})
