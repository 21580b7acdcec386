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
            opts[1].step()
            opts[1].zero_grad(set_to_none=False)  # the graph adds into these tensors
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


@pytest.mark.gpu
def test_graphs_accumulate_over_replays_of_two_shapes_sharing_a_pool():
    """Micro-batches of two shapes, each its own graph in one shared pool, accumulate into the same gradients as
    the eager backward passes do (gradient accumulation over a window)."""
    eager = qlora("cuda")
    set_checkpointing(eager, "full")
    graphed_model = copy.deepcopy(eager)
    params = [p for p in graphed_model.parameters() if p.requires_grad]
    pool = torch.cuda.graph_pool_handle()
    steps = {n: GraphedStep(lambda b: _forward_backward(graphed_model, b), params, 1, packed=False, pool=pool)
             for n in (24, 16)}  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):  # warm-ups, captures, replays
        for m in (eager, graphed_model):
            m.zero_grad(set_to_none=m is eager)
        for n, graphed in steps.items():
            batch = {"ids": torch.randint(0, 256, (2, n), device="cuda", generator=gen)}
            want = _forward_backward(eager, batch)
            torch.testing.assert_close(graphed.step(batch), want, rtol=1e-5, atol=1e-6)
        for (name, a), b in zip([(n, p) for n, p in eager.named_parameters() if p.requires_grad], params, strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(g.graph is not None for g in steps.values())


def test_trainer_refuses_cuda_graphs_where_they_cannot_run(make_model, tmp_path):
    from train_testing import synthetic_examples, train_config

    from kbit.train import Trainer
    from kbit.train.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"^cuda_graph: needs lora_dropout: 0 .*lora_dropout is 0\.05\)$"):
        build_config(overrides=train_config(tmp_path, cuda_graph=True, lora_dropout=0.05))
    config = train_config(tmp_path, cuda_graph=True, lora_dropout=0.0)
    with pytest.raises(ConfigError, match="^cuda_graph: needs a CUDA GPU, the model is on cpu; set cuda_graph: false"):
        Trainer(make_model(dropout=0.0), None, synthetic_examples(4), None, config)


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True])
def test_trainer_with_cuda_graphs_trains_as_eager(tiny_llama_dir, tmp_path, packing):
    """kbit train's cuda_graph: the same losses and adapter as the eager run, over steps of two accumulated
    micro-batches of varying shapes (padded rows) or packed rows; the graphs were captured and replayed."""
    from train_testing import synthetic_examples, train_config

    from kbit.lora import add_lora
    from kbit.models.load import load_model
    from kbit.train import Trainer

    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_llama_dir, bits=4, compute_dtype=torch.bfloat16, device="cuda")
        add_lora(model, r=4, alpha=8, dropout=0.0)
        config = train_config(tmp_path / str(graphs), cuda_graph=graphs, lora_dropout=0.0, max_steps=6,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=packing,
                              memory_plan="full")  # fmt: skip
        trainer = Trainer(model, None, synthetic_examples(12, seed=3), None, config)
        losses = trainer.train().losses
        runs[graphs] = (losses, {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad})
        if graphs:
            assert trainer.graphs and any(g.graph is not None for g in trainer.graphs.values())
    (losses0, params0), (losses1, params1) = runs[False], runs[True]
    torch.testing.assert_close(torch.tensor(losses1), torch.tensor(losses0), rtol=1e-3, atol=1e-3)
    for name, p in params0.items():
        torch.testing.assert_close(params1[name], p, rtol=1e-2, atol=1e-3, msg=name)
