"""AdamW8bit: bitsandbytes' CPU AdamW8bit byte for byte, the fused kernel against the reference, loss curves
that track float32 AdamW, exact state-dict resumption, and clear errors.

The fused Triton kernel runs on a GPU, or on CPU through Triton's interpreter in a subprocess
(TRITON_INTERPRET must be set before triton is imported). It differs from the reference only where torch's CPU
square root is not correctly rounded (kbit.kernels.triton.adamw8bit): against a reference given an IEEE sqrt
it must be exact; against the plain reference the 8-bit states must be identical and each parameter within one
ulp of its update per step."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch

from kbit.optim import OPTIMIZERS, AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer

SHAPES = [(64, 300), (100,), (4096,), (4095,), (33, 257), (5000,)]  # partial last blocks, both sides of 4,096


def make_params(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]


def grads_for(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor]:
    """Gradients whose scale changes by 10x a step, so blocks see growing and shrinking moments."""
    gen = torch.Generator().manual_seed(seed + step)
    return [(torch.randn(p.shape, generator=gen) * 10.0 ** (step % 3 - 1)).to(p.device, p.dtype) for p in params]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        for p, g in zip(params, grads_for(params, step), strict=True):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_bitsandbytes_cpu_step_for_step(dtype, weight_decay):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = AdamW8bit(ours, lr=1e-2, weight_decay=weight_decay)
    ref = bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=weight_decay)
    for step in range(4):  # step 0 from zero state; later steps from the (identical) nontrivial state
        run(opt, ours, range(step, step + 1))
        run(ref, theirs, range(step, step + 1))
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q), f"parameter {tuple(p.shape)} differs at step {step}"
            a, b = opt.state[p], ref.state[q]
            assert a["step"] == b["step"] == step + 1
            for key in ("state1", "state2", "absmax1", "absmax2"):
                assert (key in a) == (key in b)
                if key in a:
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (key, tuple(p.shape))


def test_small_tensors_keep_fp32_state():
    params = [torch.zeros(4095, requires_grad=True), torch.zeros(4096, requires_grad=True)]
    opt = AdamW8bit(params)
    run(opt, params, range(1))
    small, large = opt.state[params[0]], opt.state[params[1]]
    assert small["state1"].dtype == small["state2"].dtype == torch.float32 and "absmax1" not in small
    assert large["state1"].dtype == large["state2"].dtype == torch.uint8
    assert large["absmax1"].shape == large["absmax2"].shape == (16,)  # 4,096 / 256 blocks


# Runs in a subprocess with TRITON_INTERPRET=1: the fused path (flat buffers, tile table, kernel) on CPU
# tensors.
INTERPRETED = textwrap.dedent(
    """
    import torch
    from kbit.optim import AdamW8bit
    from kbit.optim import adamw8bit as mod
    from tests.optim.test_adamw8bit import make_params, run, SHAPES

    def ieee_sqrt(x):
        return x.double().sqrt().float()

    for dtype in (torch.float32, torch.bfloat16):
        fused, ref, ieee = make_params(dtype), make_params(dtype), make_params(dtype)
        opts = [AdamW8bit(ps, lr=1e-2, weight_decay=0.1) for ps in (fused, ref, ieee)]
        opts[0]._fused = lambda p: True  # the Triton path on CPU tensors (interpreted)
        real = mod.adamw8bit_update_
        for step in range(3):
            run(opts[0], fused, range(step, step + 1))
            run(opts[1], ref, range(step, step + 1))
            mod.adamw8bit_update_ = lambda *a: real(*a, sqrt=ieee_sqrt)
            run(opts[2], ieee, range(step, step + 1))
            mod.adamw8bit_update_ = real
            for p, q, r in zip(fused, ref, ieee):
                a, b, c = opts[0].state[p], opts[1].state[q], opts[2].state[r]
                big = p.numel() >= 4096
                if big:  # small tensors take the same torch ops on every path
                    assert torch.equal(p, r), ("not exact vs IEEE-sqrt reference", dtype, step, p.shape)
                for k in b:
                    assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (k, dtype, step,
                    p.shape)
                # one ulp of the update per step: |update| <= lr / c1 * max|m| / min(denom) is ~lr; allow
                # 2^-20 lr
                bound = (step + 1) * 1e-2 * 2.0**-20 + 2 * torch.finfo(dtype).eps * p.detach().abs()
                assert ((p - q).abs() <= bound).all(), (dtype, step, p.shape)
    print("ok")
    """
)


@pytest.mark.slow
def test_fused_kernel_matches_reference_interpreted():
    pytest.importorskip("triton", reason="the Triton interpreter needs the triton package (CUDA installs have it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def regression_losses(opt_name: str, steps: int = 100) -> list[float]:
    """Least squares y = X W* + noise with W [128 x 64] (8,192 weights: 8-bit state) and a 64-bias (fp32
    state)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    y = x @ torch.randn(128, 64, generator=gen) + 0.1 * torch.randn(512, 64, generator=gen)
    model = torch.nn.Linear(128, 64)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = build_optimizer(opt_name, model.parameters(), lr=3e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_regression_loss_tracks_fp32_adamw():
    fp32, q8 = regression_losses("adamw"), regression_losses("adamw_8bit")
    assert fp32[-1] < 0.02 * fp32[0]  # the problem is being learnt (130 -> 1.1 in 100 steps)
    # Measured: the curves are never more than 0.2% of the initial loss apart, and at most 6.2% apart relative
    # to the fp32 loss (at step 100, where both still fall fast). Stated tolerances: 1% and 10%.
    assert max(abs(a - b) for a, b in zip(q8, fp32, strict=True)) < 0.01 * fp32[0]
    assert max(abs(a - b) / b for a, b in zip(q8, fp32, strict=True)) < 0.10


def lora_losses(opt_name: str, steps: int = 60) -> list[float]:
    """LoRA (r=16, all linears) on a random one-layer Llama memorising one batch; A/B tensors of 2K-8K
    elements."""
    transformers = pytest.importorskip("transformers")
    from kbit.lora import add_lora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=256,
    )
    model = add_lora(transformers.LlamaForCausalLM(config), r=16, alpha=32, dropout=0.0, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(opt_name, params, lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_lora_loss_tracks_fp32_adamw():
    fp32, q8 = lora_losses("adamw"), lora_losses("adamw_8bit")
    assert fp32[-1] < 0.7 * fp32[0]
    # Measured: at most 0.17% apart at any step; 3% is a stated tolerance with margin for other CPUs.
    rel = [abs(a - b) / b for a, b in zip(q8, fp32, strict=True)]
    assert max(rel) < 0.03, max(rel)


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit, PagedAdamW])
def test_state_dict_resumes_bit_for_bit(cls, device="cpu"):
    straight, resumed = make_params(torch.float32, device), make_params(torch.float32, device)
    opt = cls(straight, lr=1e-2)
    run(opt, straight, range(6))

    first = cls(resumed, lr=1e-2)
    run(first, resumed, range(3))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    fresh = make_params(torch.float32, device)
    with torch.no_grad():
        for p, q in zip(fresh, resumed, strict=True):
            p.copy_(q)
    second = cls(fresh, lr=1e-2)
    buf.seek(0)
    second.load_state_dict(torch.load(buf, weights_only=True))
    run(second, fresh, range(3, 6))
    for p, q in zip(straight, fresh, strict=True):
        assert torch.equal(p, q)
    sd_a, sd_b = opt.state_dict()["state"], second.state_dict()["state"]
    for k in sd_a:
        for name, v in sd_a[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd_b[k][name])), name


def test_state_dict_holds_copies_not_views():
    params = make_params(torch.float32)
    opt = AdamW8bit(params)
    run(opt, params, range(1))
    sd = opt.state_dict()
    saved = sd["state"][0]["state1"].clone()
    run(opt, params, range(1, 2))
    assert torch.equal(sd["state"][0]["state1"], saved)


def test_build_optimizer_names():
    params = [torch.zeros(4, requires_grad=True)]
    assert isinstance(build_optimizer("adamw", params, lr=1e-3), torch.optim.AdamW)
    assert type(build_optimizer("adamw_8bit", params, lr=1e-3)) is AdamW8bit
    assert type(build_optimizer("paged_adamw", params, lr=1e-3)) is PagedAdamW
    assert type(build_optimizer("paged_adamw_8bit", params, lr=1e-3)) is PagedAdamW8bit
    opt = build_optimizer("adamw_8bit", params, lr=5e-4, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["weight_decay"] == 0.05


def test_unknown_optimizer_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        build_optimizer("adam8", [torch.zeros(4, requires_grad=True)], lr=1e-3)
    assert all(name in str(err.value) for name in OPTIMIZERS)


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit, PagedAdamW])
def test_sparse_gradients_are_refused(cls):
    emb = torch.nn.Embedding(10, 8, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        cls(emb.parameters()).step()


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit, PagedAdamW])
def test_mixed_devices_are_refused(cls):
    a = torch.zeros(8, requires_grad=True)
    b = torch.zeros(8, device="meta", requires_grad=True)
    a.grad, b.grad = torch.ones(8), torch.ones(8, device="meta")
    with pytest.raises(RuntimeError, match="one device"):
        cls([a, b]).step()


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        AdamW8bit([torch.zeros(4, requires_grad=True)], **kwargs)


def test_state_dict_from_other_parameters_is_refused():
    opt = AdamW8bit([torch.zeros(8192, requires_grad=True)])
    run(opt, opt.param_groups[0]["params"], range(1))
    other = AdamW8bit([torch.zeros(16384, requires_grad=True)])
    with pytest.raises(ValueError, match="does not belong"):
        other.load_state_dict(opt.state_dict())
