"""Helpers shared by tests in several folders (a module of its own: every folder's conftest is named conftest)."""

import torch


def save_tiny_llama(folder, tokenizer_dir=None, seed: int = 0, **overrides):
    """Save a tiny random LlamaForCausalLM (fp32) to ``folder``, with the tokenizer in ``tokenizer_dir`` if given."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152 if tokenizer_dir else 256,
        tie_word_embeddings=True,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(folder)
    if tokenizer_dir:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder)
    return model
