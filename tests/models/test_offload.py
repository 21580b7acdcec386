"""Offload to host memory: checkpointed layer inputs (copied out in the forward, back one layer ahead in the
backward) and the input embedding table (looked up on the CPU), each computing exactly what it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from kbit_testing import FAMILY_CONFIGS, TINY
from transformers import AutoConfig, AutoModelForCausalLM

from kbit.lora import add_lora
from kbit.models.offload import HostEmbedding, Offloader, SavedInput, offload_input_embeddings


def test_offload_holds_inputs_in_host_copies_and_prefetches_one_layer_ahead():
    """Three checkpointed 'layers' through one Offloader: each saved input is a separate host copy linked to the
    one before it; recomputing layer i finds layer i-1's copy back already started and layer i-2's not."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    x = torch.randn(4, 8, requires_grad=True)
    offloader = Offloader()
    recomputing = []  # (layer, fetched state of every saved input) seen inside each recomputation

    saved: list[SavedInput] = []  # filled after the forward: a call that finds it filled is a recomputation

    def layer(i):
        def run(h):
            if saved:
                recomputing.append((i, [s.fetched is not None for s in saved]))
            return torch.tanh(h @ weights[i])

        return run

    h = x
    inputs = []
    for i in range(3):
        inputs.append(h)
        h = offloader.checkpoint(layer(i), h)
    chain, link = [], offloader._last
    while link is not None and link() is not None:
        chain.append(link())
        link = chain[-1].previous
    saved.extend(reversed(chain))  # forward order
    assert len(saved) == 3
    for s, inp in zip(saved, inputs, strict=True):
        assert torch.equal(s.host, inp) and s.host.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()
    h.sum().backward()
    # layer 2 recomputes with layer 1's input on its way back; layer 1 with layer 0's; layer 0 has nothing before it
    assert recomputing == [(2, [False, True, False]), (1, [True, False, False]), (0, [False, False, False])]
    grads = [w.grad.clone() for w in weights] + [x.grad.clone()]
    for w in weights:
        w.grad = None
    x.grad = None
    h = x
    for i in range(3):
        h = torch.tanh(h @ weights[i])
    h.sum().backward()
    for got, want in zip(grads, [w.grad for w in weights] + [x.grad], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def tiny(model_type: str = "llama", device: str = "cpu", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(TINY | FAMILY_CONFIGS[model_type] | overrides))
    m = AutoModelForCausalLM.from_config(config).to(device)
    add_lora(m, r=4, alpha=8, dropout=0.0)
    return m.train()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: a scaled embedding (its own forward)
def test_host_embedding_changes_no_number_and_leaves_the_parameters(model_type):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = tiny(model_type, tie_word_embeddings=False)
    moved = copy.deepcopy(base)
    assert offload_input_embeddings(moved) == "input embeddings: 0.00 GiB table moved to CPU memory"
    assert isinstance(moved.get_input_embeddings(), HostEmbedding)
    assert offload_input_embeddings(moved) == "input embeddings: in CPU memory"
    assert moved.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(moved.state_dict()["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    table = base.model.embed_tokens.weight
    assert len(list(moved.parameters())) == len(list(base.parameters())) - 1
    assert all(p is not table for p in moved.parameters())
    out = {}
    for name, m in (("gpu", base), ("host", moved)):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["host"][0], out["gpu"][0], atol=0, rtol=0)
    for name, g in out["gpu"][1].items():
        torch.testing.assert_close(out["host"][1][name], g, atol=0, rtol=0, msg=name)


def test_host_embedding_refuses_tied_and_trained_tables():
    tied = tiny(tie_word_embeddings=True)
    line = offload_input_embeddings(tied)
    assert line == "input embeddings: kept on the GPU (tied to the LM head, which the GPU needs)"
    trained = tiny(tie_word_embeddings=False)
    trained.model.embed_tokens.weight.requires_grad_(True)
    assert offload_input_embeddings(trained) == "input embeddings: kept on the GPU (they are trained)"
    assert not isinstance(trained.get_input_embeddings(), HostEmbedding)


@pytest.mark.gpu
def test_host_embedding_frees_its_table_on_the_gpu():
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    m = tiny(device="cuda", tie_word_embeddings=False, vocab_size=32768)
    loss0 = m(input_ids=ids, labels=ids, use_cache=False).loss.detach()
    table = m.model.embed_tokens.weight.nbytes
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offload_input_embeddings(m)
    assert before - torch.cuda.memory_allocated() == table
    loss = m(input_ids=ids, labels=ids, use_cache=False).loss
    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss.detach(), loss0, atol=0, rtol=0)
