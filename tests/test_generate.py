"""generate(): chat-template rendering, greedy decoding with the KV cache, the dense CPU shortcut."""

import pytest
import torch
from kbit_testing import save_tiny_llama

from kbit.export import load_adapter, save_adapter
from kbit.generate import generate, generate_batch, generate_ids, render_prompt
from kbit.lora import active_adapter, add_lora, lora_layers
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
    with pytest.raises(ValueError, match="exceeds the model's context of 64.*truncate"):
        generate(model, tok, "word " * 80, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, "hi", max_new_tokens=0)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random Llama loaded in 4 bits with a LoRA adapter whose B is non-zero, and the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("tiny_chat")
    save_tiny_llama(root, smol_tokenizer_dir)
    model, tok = load_model(root, device="cpu"), load_tokenizer(root)
    add_lora(model, r=4, dropout=0.0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model, tok


@pytest.mark.parametrize("dense", [False, True])
def test_static_engine_equals_transformers(tiny_chat, dense):
    model, tok = tiny_chat
    ours = generate_ids(model, tok, "Tell me a story", max_new_tokens=64, engine="static", dense=dense)
    ref = generate_ids(model, tok, "Tell me a story", max_new_tokens=64, engine="transformers", dense=dense)
    assert ours == ref and len(ours) > 8


def test_batch_equals_one_by_one(tiny_chat):
    model, tok = tiny_chat
    prompts = ["One", "Two words here", [{"role": "user", "content": "Three"}]]
    batch = generate_batch(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert batch == [generate(model, tok, p, max_new_tokens=12) for p in prompts]


def test_sampling_is_seeded(tiny_chat):
    model, tok = tiny_chat
    a = generate_ids(model, tok, "Hi", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    b = generate_ids(model, tok, "Hi", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    greedy = generate_ids(model, tok, "Hi", max_new_tokens=16)
    assert a == b and a != greedy


def test_truncate_keeps_the_end_of_a_long_prompt(tmp_path, smol_tokenizer_dir):
    save_tiny_llama(tmp_path, smol_tokenizer_dir, max_position_embeddings=64)
    model, tok = load_model(tmp_path, device="cpu"), load_tokenizer(tmp_path)
    ids = generate_ids(model, tok, "word " * 80, max_new_tokens=8, truncate=True)
    assert 0 < len(ids) <= 8
    with pytest.raises(ValueError, match="no prompts"):
        generate_batch(model, tok, [], max_new_tokens=8)
    with pytest.raises(ValueError, match="engine must be one of"):
        generate(model, tok, "hi", engine="fast")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, smol_tokenizer_dir):
    """A tiny 4-bit Llama folder and two adapters for it (a: alpha 8, b: alpha 16, random non-zero B)."""
    root = tmp_path_factory.mktemp("two_adapters")
    save_tiny_llama(root / "base", smol_tokenizer_dir)
    for name, seed, alpha in (("a", 1, 8), ("b", 2, 16)):
        model = add_lora(load_model(root / "base", device="cpu"), r=4, alpha=alpha, dropout=0.0)
        torch.manual_seed(seed)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        save_adapter(model, root / name)
    return root, load_tokenizer(root / "base")


def test_adapter_per_request_equals_a_model_with_only_that_adapter(two_adapters):
    root, tok = two_adapters
    multi = load_model(root / "base", device="cpu")
    load_adapter(multi, root / "a", name="a")
    load_adapter(multi, root / "b", name="b")
    only = {n: load_adapter(load_model(root / "base", device="cpu"), root / n) for n in ("a", "b")}
    only["base"] = load_model(root / "base", device="cpu")
    answers = {n: generate_ids(m, tok, "Tell me a story", max_new_tokens=10) for n, m in only.items()}
    assert len({tuple(a) for a in answers.values()}) == 3  # three different models
    for name in ("b", "base", "a"):
        assert generate_ids(multi, tok, "Tell me a story", max_new_tokens=10, adapter=name) == answers[name], name
        assert active_adapter(multi) == "a"  # a request's adapter is for that request only
    prompts = ["Tell me a story", "Hi"]
    batch = generate_batch(multi, tok, prompts, max_new_tokens=10, adapter="b", engine="transformers")
    assert batch == generate_batch(only["b"], tok, prompts, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; loaded: a, b \(or 'base' for none\)"):
        generate(multi, tok, "Hi", adapter="c")
