"""The cached parameter set (kbit.optim.plan): reused while parameters and gradients keep their identity,
rebuilt when a param group is added or a gradient appears or vanishes, and never changing a result: steps
equal bitsandbytes' (uncached) AdamW8bit byte for byte through every such change. The fused kernel's side
(buckets, tables, paged chunks) is checked through Triton's interpreter in test_paged.py and on the GPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_adamw8bit import grads_for, make_params  # tests/optim is on sys.path (pytest rootdir import)

from kbit.optim import AdamW8bit, PagedAdamW
from kbit.optim.plan import ParamSet

EXTRA = [(40, 300), (50,)]  # a second param group added at step 4: one 8-bit, one float32-state tensor
# Which parameters (by index into SHAPES + EXTRA) have no gradient at each step: the set changes at steps 2,
# 4 and 6 and holds at 1, 3, 5 and 7 (where the cached grouping only advances its step counts).
NO_GRAD = {0: set(), 1: set(), 2: {0, 3}, 3: {0, 3}, 4: {2}, 5: {2}, 6: {7}, 7: {7}}


def extra_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in EXTRA]


def scripted_run(opt: torch.optim.Optimizer, params: list[torch.Tensor], extra: list[torch.Tensor], step: int):
    """One step of the script: groups grow at step 4, gradients vanish per NO_GRAD, and at step 5 the
    gradient tensors are reused (written in place) instead of replaced."""
    if step == 4:
        opt.add_param_group({"params": extra, "lr": 3e-3, "weight_decay": 0.2})
    live = params + (extra if step >= 4 else [])
    for i, (p, g) in enumerate(zip(live, grads_for(live, step), strict=True)):
        if i in NO_GRAD[step]:
            p.grad = None
        elif step == 5 and p.grad is not None:
            p.grad.copy_(g)  # same tensor object as last step: the cache must still see the new values
        else:
            p.grad = g
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changing_parameter_set_matches_bitsandbytes(dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    extra_ours, extra_theirs = extra_params(dtype), extra_params(dtype)
    opt = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    ref = bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1)
    for step in range(len(NO_GRAD)):
        scripted_run(opt, ours, extra_ours, step)
        scripted_run(ref, theirs, extra_theirs, step)
        for p, q in zip(ours + extra_ours, theirs + extra_theirs, strict=True):
            assert torch.equal(p, q), (step, tuple(p.shape))
            a, b = opt.state.get(p, {}), ref.state.get(q, {})
            for k in ("step", "state1", "state2", "absmax1", "absmax2"):
                assert (k in a) == (k in b), (step, k, tuple(p.shape))
                if k in b:
                    assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (step, k, tuple(p.shape))


def test_param_set_is_reused_until_it_changes():
    params = make_params(torch.float32)
    opt = AdamW8bit(params, lr=1e-2)

    def step(grads, none=()):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i in none else g
        opt.step()
        return opt._params, opt._params.batches

    ps, batches = step(grads_for(params, 0))
    assert step(grads_for(params, 1)) == (ps, batches)  # new gradient tensors, same set: nothing rebuilt
    assert step(grads_for(params, 2), none={1})[0] is ps  # a gradient vanished: same set, regrouped
    assert ps.batches is not batches and ps.active == [0, 2, 3, 4, 5]
    assert [b.step for b in ps.batches] == [3]
    ps2, _ = step(grads_for(params, 3))  # it is back, one step behind the others: two batches
    assert ps2 is ps and sorted((b.step, len(b.indices)) for b in ps.batches) == [(3, 1), (4, 5)]
    extra = torch.zeros(5000, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(5000)
    ps3, _ = step(grads_for(params, 4))
    assert ps3 is not ps and ps3.params[-1] is extra and opt.state[extra]["step"] == 1


def test_param_set_reads_every_gradient():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = AdamW8bit(params)
    ps = ParamSet(opt)
    assert not ps.refresh() and ps.first_with_grad() is None  # no gradients anywhere: nothing changed
    params[1].grad = torch.ones(2)
    assert ps.refresh() and ps.first_with_grad() is params[1]
    assert not ps.refresh()  # the same gradient tensor
    params[1].grad = torch.ones(2)
    assert not ps.refresh()  # a new tensor, but the same parameters have gradients
    params[0].grad = torch.ones(3)
    assert ps.refresh()


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW])
def test_sparse_gradient_after_cached_steps_is_refused(cls):
    p = torch.zeros(10, requires_grad=True)
    opt = cls([p])
    for _ in range(2):
        p.grad = torch.ones(10)
        opt.step()
    p.grad = torch.ones(10).to_sparse()
    for _ in range(2):  # refused again: a refused gradient is not remembered as checked
        with pytest.raises(RuntimeError, match="sparse gradients"):
            opt.step()


def test_fused_path_refuses_strided_gradients():
    p = torch.zeros(64, 64, requires_grad=True)
    opt = AdamW8bit([p])
    ps = opt._param_set()
    p.grad = torch.ones(64, 64).t()
    ps.refresh()
    with pytest.raises(RuntimeError, match="contiguous"):
        ps.activate(opt.state, opt._init_state, lambda s: s["step"], contiguous=True)


def test_unknown_transfer_is_refused():
    from kbit.optim import PagedAdamW8bit

    with pytest.raises(ValueError, match="copy, mapped"):
        PagedAdamW8bit([torch.zeros(4, requires_grad=True)], transfer="managed")
