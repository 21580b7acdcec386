"""Offload to host memory: checkpointed layer inputs (copied out in the forward, back one layer ahead in the
backward) and the input embedding table (looked up on the CPU), each computing exactly what it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from kbit_testing import FAMILY_CONFIGS, TINY
from transformers import AutoConfig, AutoModelForCausalLM

from kbit.lora import add_lora
from kbit.models.offload import (
    PAGE_BYTES,
    HostEmbedding,
    HostPool,
    Offloader,
    SavedInput,
    offload_input_embeddings,
    pinned_host_bytes,
    registered_bytes,
)


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
    saved.extend(offloader.saved())
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


def chain_step(offloader: Offloader, weights: list[torch.Tensor], x: torch.Tensor) -> list[SavedInput]:
    """Forward through one checkpointed, offloaded 'layer' per weight; the saved inputs (forward order), then the
    backward (the saved inputs are freed by it: their buffers go back to the offloader's pool)."""
    h = x
    for w in weights:
        h = offloader.checkpoint(lambda t, w=w: torch.tanh(t @ w), h)
    saved = offloader.saved()
    facts = [(s.host.data_ptr(), s.buffer.nbytes) for s in saved]
    del saved
    h.sum().backward()
    return facts


def test_host_buffers_are_exact_and_reused_from_step_to_step():
    """Each offloaded input gets a host buffer of exactly its bytes; after the backward the buffers wait in the
    offloader's pool and the next step's inputs reuse them (no new memory); a longer batch releases them and takes
    exact ones of its size; a shorter one reuses the larger ones."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    offloader = Offloader()
    first = chain_step(offloader, weights, torch.randn(5, 8, requires_grad=True))
    assert [n for _, n in first] == [5 * 8 * 4] * 3  # float32 [5, 8]: exact, not a power of two (256)
    assert offloader.pool.free_bytes == 3 * 160  # all back in the pool after the backward
    again = chain_step(offloader, weights, torch.randn(5, 8, requires_grad=True))
    assert sorted(again) == sorted(first)  # the same three buffers
    longer = chain_step(offloader, weights, torch.randn(9, 8, requires_grad=True))
    assert [n for _, n in longer] == [9 * 8 * 4] * 3 and offloader.pool.free_bytes == 3 * 288  # the 160s released
    shorter = chain_step(offloader, weights, torch.randn(2, 8, requires_grad=True))
    assert sorted(shorter) == sorted(longer) and offloader.pool.free_bytes == 3 * 288
    offloader.pool.clear()
    assert offloader.pool.free_bytes == 0


def test_host_pool_takes_the_smallest_buffer_that_fits():
    pool = HostPool()
    small, large = pool.take(100, pin=False), pool.take(300, pin=False)
    assert (small.nbytes, large.nbytes, small.data.numel()) == (100, 300, 100)
    pool.give_back(large)
    pool.give_back(small)
    assert pool.take(90, pin=False) is small and pool.take(90, pin=False) is large
    pool.give_back(small)
    bigger = pool.take(400, pin=False)  # nothing free holds 400: the free 100 is released, a 400 made
    assert bigger.nbytes == 400 and pool.free_bytes == 0
    page = PAGE_BYTES
    assert registered_bytes(1) == registered_bytes(page) == page and registered_bytes(page + 1) == 2 * page


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
    host = m.get_input_embeddings()
    assert host.host is not None and host.weight.is_pinned()  # page-locked: the GPU gathers the rows in place
    assert pinned_host_bytes()[0] >= table
    rows = host(ids)
    assert rows.is_cuda
    torch.testing.assert_close(rows, host.weight[ids.cpu()].cuda(), atol=0, rtol=0)
    with pytest.raises(IndexError, match="token id 32768 is outside the vocabulary of 32768"):
        host(torch.tensor([[1, 32768]], device="cuda"))


@pytest.mark.gpu
def test_offloaded_inputs_are_page_locked_exactly_and_reused_on_gpu():
    """On CUDA each offloaded layer input lands in page-locked host memory (is_pinned) of its exact size, registered
    by kbit (torch's pinned pool stays untouched); the gradients equal no offload; the next step reuses the buffers
    (nothing more is locked) and freeing the offloader unlocks them."""
    import gc

    torch.manual_seed(0)
    weights = [torch.randn(256, 256, device="cuda", requires_grad=True) for _ in range(3)]
    x = torch.randn(1000, 256, device="cuda", requires_grad=True)  # 1,024,000 bytes: not a power of two
    h = x
    for w in weights:
        h = torch.tanh(h @ w)
    h.sum().backward()
    want = [t.grad.clone() for t in (*weights, x)]
    for t in (*weights, x):
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    locked0 = pinned_host_bytes()[0]
    torch_pinned0 = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    offloader = Offloader()
    h = x
    for w in weights:
        h = offloader.checkpoint(lambda t, w=w: torch.tanh(t @ w), h)
    saved = offloader.saved()
    assert len(saved) == 3
    for s in saved:
        assert s.host.is_pinned() and s.host.device.type == "cpu"
        assert s.buffer.nbytes == 1000 * 256 * 4 and s.host.nbytes == s.buffer.nbytes
    step = 3 * registered_bytes(1000 * 256 * 4)
    assert pinned_host_bytes()[0] - locked0 == step == 3 * 1_024_000  # 250 pages each, exactly
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == torch_pinned0
    ptrs = sorted(s.host.data_ptr() for s in saved)
    del saved, s  # the backward frees the saved inputs, returning their buffers to the pool
    h.sum().backward()
    torch.cuda.synchronize()
    for got, w in zip((*weights, x), want, strict=True):  # the same kernels on the same (copied back) inputs
        torch.testing.assert_close(got.grad, w, atol=1e-6, rtol=1e-6)
    assert offloader.pool.free_bytes == 3 * 1_024_000
    assert sorted(chain_step(offloader, weights, x)) == [(p, 1_024_000) for p in ptrs]  # the same buffers again
    assert pinned_host_bytes()[0] - locked0 == step
    del offloader, h
    gc.collect()
    assert pinned_host_bytes()[0] == locked0  # unlocked and freed with the offloader
