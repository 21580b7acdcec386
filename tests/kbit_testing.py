"""Helpers shared by tests in several folders (a module of its own: every folder's conftest is named conftest)."""

import shutil

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
# Per-family settings that make a TINY model of each supported family valid (GQA where the family has it).
FAMILY_CONFIGS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    "phi3": dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(rotary_pct=0.5),
}

TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256,
)  # fmt: skip


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 LlamaForCausalLM small enough for CPU tests (hidden 64, 2 layers, vocab 256), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(TINY_LLAMA | overrides))).eval()


def save_tiny_llama(folder, tokenizer_dir=None, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save :func:`tiny_llama` (tied embeddings) to ``folder``, with the tokenizer in ``tokenizer_dir`` if given."""
    kw = dict(vocab_size=49152 if tokenizer_dir else 256, tie_word_embeddings=True) | overrides
    model = tiny_llama(seed, **kw)
    model.save_pretrained(folder)
    if tokenizer_dir:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder)
    return model


def bnb_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each bitsandbytes Linear4bit replaced by an ``nn.Linear`` of bitsandbytes' dequantized weight.

    bitsandbytes' float32 dequantization, rounded to bf16 here: on CPUs with AVX-512 BF16 its CPU forward is a fused
    kernel with bf16 block scales (its own approximation, not the dequantize-then-matmul both libraries define), so
    the oracle is its dequantized weight in a plain bf16 matmul, which is what its forward computes elsewhere.
    """
    import copy

    import bitsandbytes.functional as bnbf

    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Linear4bit":
            state = copy.copy(mod.weight.quant_state)
            state.dtype = torch.float32
            dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.bfloat16)
            dense.weight.data = bnbf.dequantize_4bit(mod.weight.data, state).to(torch.bfloat16)
            if mod.bias is not None:
                dense.bias.data = mod.bias.data.to(torch.bfloat16)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


def kept_bytes_per_layer(model: torch.nn.Module, ids: torch.Tensor, layers: int) -> float:
    """CUDA bytes one decoder layer keeps for the backward beyond its input: what a forward of ``ids`` leaves
    allocated with no layer recomputed, minus the same with every layer recomputed, per layer."""
    from kbit.models.checkpointing import set_checkpointing

    held = {}
    for plan in ("none", "full"):
        set_checkpointing(model, plan)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(input_ids=ids, use_cache=False).logits
        held[plan] = torch.cuda.memory_allocated() - before
        del out
    return (held["none"] - held["full"]) / layers
