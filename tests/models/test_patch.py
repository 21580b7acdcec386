"""apply_fast_path: a patched model computes the unpatched model's loss and LoRA gradients, family by family.

Tiny random models of each supported family (NF4 Linear4bit bases computing in float32, LoRA with a nonzero B
so every adapter changes the output) run on the CPU, where the fused ops are their PyTorch references: the
patched forward (fused RMSNorm, SwiGLU, RoPE, chunked LM-head cross-entropy) must give transformers' loss and
the same adapter gradients up to float32 summation order (measured: under 1e-6 relative; 1e-5 asserted).
"""

from __future__ import annotations

import copy

import pytest
import torch
from kbit_testing import FAMILY_CONFIGS, TINY
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kbit.lora import add_lora, lora_layers
from kbit.models.patch import apply_fast_path
from kbit.nn import Linear4bit

FAMILIES = {k: v for k, v in FAMILY_CONFIGS.items() if k != "gpt_neox"}  # the fast path's families
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(model_type: str, quantize: bool = True, seed: int = 0, targets="all-linear", **overrides) -> nn.Module:
    """A random float32 model of ``model_type`` with NF4 linears (float32 compute) and LoRA (nonzero B)."""
    config = AutoConfig.for_model(model_type, **(TINY | FAMILIES.get(model_type, {}) | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # norms away from their initial constant, so a wrong offset or rounding shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if quantize:
        head = model.get_output_embeddings()
        for name, mod in list(model.named_modules()):
            if type(mod) is nn.Linear and mod is not head:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Linear4bit.from_linear(mod, compute_dtype=torch.float32))
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    return model.train()


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask, labels


def loss_and_grads(model: nn.Module, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patched_loss_and_lora_gradients_equal_unpatched(model_type):
    """Measured: loss within 5e-7, adapter gradients within 1e-6 of their largest value, every family."""
    ref = tiny(model_type)
    model = copy.deepcopy(ref)
    line = apply_fast_path(model)
    assert line.startswith(f"fast path for {model_type}: fused RMSNorm x")
    assert "RoPE x2" in line and "chunked LM-head cross-entropy" in line
    assert ("SwiGLU x2" in line) == (model_type != "gemma2")  # Gemma2's gelu-tanh MLP is kept
    ids, mask, labels = batch()
    out_ref, g_ref = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # never materialised
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    assert g.keys() == g_ref.keys() and all("lora_" in name for name in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=name)


def test_logits_without_labels_and_in_eval_are_unchanged():
    ref = tiny("qwen3").eval()
    model = copy.deepcopy(ref)
    apply_fast_path(model)
    ids, mask, _ = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref(ids, mask).logits, **TOL)
        keep = torch.tensor([3, 7])  # what kbit's trainer passes: no labels, only positions with a target
        torch.testing.assert_close(
            model(input_ids=ids, logits_to_keep=keep).logits, ref(input_ids=ids, logits_to_keep=keep).logits, **TOL
        )


def test_token_normalised_sum_and_shift_labels():
    """num_items_in_batch (transformers' accumulation contract) gives sum / n; shift_labels skips the shift."""
    ref = tiny("llama", quantize=False)
    model = copy.deepcopy(ref)
    apply_fast_path(model)
    ids, mask, labels = batch(2)
    n = torch.tensor(37)
    shifted = torch.roll(labels, -2, 1)  # any targets: with shift_labels transformers uses them as they are
    for kwargs in (dict(labels=labels, num_items_in_batch=n), dict(labels=labels, shift_labels=shifted)):
        out_ref, g_ref = loss_and_grads(ref, input_ids=ids, attention_mask=mask, **kwargs)
        out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, **kwargs)
        torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=name)


def test_trainable_head_gets_its_gradient():
    ref = tiny("mistral", quantize=False)
    ref.lm_head.weight.requires_grad_(True)
    model = copy.deepcopy(ref)
    apply_fast_path(model)
    ids, mask, labels = batch(3)
    _, g_ref = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    _, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(g["lm_head.weight"], g_ref["lm_head.weight"], **TOL)


def test_lora_head_keeps_the_reference_loss():
    ref = tiny("llama", quantize=False, targets=["q_proj", "lm_head"])
    model = copy.deepcopy(ref)
    apply_fast_path(model)
    ids, mask, labels = batch(4)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None  # a LoRA head: the materialised-logits loss, transformers' own
    torch.testing.assert_close(out.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss, **TOL)


def test_unsupported_family_and_patching_twice():
    model = tiny("gpt_neox", quantize=False, rotary_pct=0.5)
    line = apply_fast_path(model)
    assert line == (
        "fast path: model type 'gpt_neox' is not supported (llama, mistral, qwen2, qwen3, gemma2, phi3); "
        "using the reference path"
    )
    llama = tiny("llama", quantize=False)
    first = apply_fast_path(llama)
    forward = llama.forward
    assert apply_fast_path(llama) == first and llama.forward == forward


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma2"])
def test_patched_training_step_matches_on_gpu(model_type):
    """bf16 on the GPU (Triton kernels): loss and LoRA gradients within bf16 noise of transformers' path."""
    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000, pad_token_id=0)  # fmt: skip
    if model_type == "gemma2":
        shape |= dict(head_dim=128, query_pre_attn_scalar=128, sliding_window=512)
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(0)
    attn = "eager" if model_type == "gemma2" else "sdpa"  # Gemma2's attention soft-cap has no SDPA path
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn).cuda()
    add_lora(ref, r=16, alpha=32, dropout=0.0, dtype=torch.bfloat16)
    with torch.no_grad():
        for _, layer in lora_layers(ref):
            layer.lora_B.weight.normal_(0, 0.02)
    ref.train()
    model = copy.deepcopy(ref)
    apply_fast_path(model)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    labels = ids.clone()
    labels[:, :100] = -100
    out_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=labels)
    out, g = loss_and_grads(model, input_ids=ids, labels=labels)
    # bf16 noise: the fused ops round where transformers' do, but reductions and exp differ in the last bit and
    # that spreads through 4 layers; a wrong term would differ by O(1), not by 1e-3 of the loss or 5% of a gradient.
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-2, rtol=1e-3)
    for name in g_ref:
        a, b = g[name].float(), g_ref[name].float()
        rel = (a - b).norm() / b.norm()
        assert rel < 0.05, f"{name}: relative gradient difference {rel:.4f}"
