"""generate(): chat-template rendering, greedy decoding with the KV cache, the dense CPU shortcut."""

import pytest
import torch
from kbit_testing import save_tiny_llama

from kbit.generate import generate, generate_ids, render_prompt
from kbit.lora import add_lora, lora_layers
from kbit.models import load_model, load_tokenizer


def test_default_model_answers_capital_of_france(default_model):
    model, tok = default_model
    answer = generate(model, tok, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer and answer[0].isupper()


def test_dense_shortcut_gives_the_same_tokens(tmp_path, smol_tokenizer_dir):
    save_tiny_llama(tmp_path, smol_tokenizer_dir)
    model, tok = load_model(tmp_path, device="cpu"), load_tokenizer(tmp_path)
    add_lora(model, r=4, dropout=0.0, use_dora=True)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    a = generate_ids(model, tok, "Hello there", max_new_tokens=64, dense=False)
    b = generate_ids(model, tok, "Hello there", max_new_tokens=64, dense=True)
    assert a == b and len(a) > 0
    assert isinstance(
        model.model.layers[0].mlp.up_proj.base_layer, type(model.model.layers[0].mlp.down_proj.base_layer)
    )


def test_render_prompt_uses_chat_template(smol_tokenizer_dir):
    tok = load_tokenizer(smol_tokenizer_dir)
    text = tok.decode(render_prompt(tok, "Hi")[0])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


def test_errors(tmp_path, smol_tokenizer_dir):
    save_tiny_llama(tmp_path, smol_tokenizer_dir, max_position_embeddings=64)
    model, tok = load_model(tmp_path, device="cpu"), load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, tok, "word " * 80, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, "hi", max_new_tokens=0)
