"""Tiny models and synthetic data for the trainer tests: a 2-layer Llama (hidden 64) loaded through kbit."""

from __future__ import annotations

import shutil
import string

import pytest
import torch
from train_testing import VOCAB


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved random LlamaForCausalLM folder (config.json + model.safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def make_model(tiny_llama_dir):
    """make_model(bits=4, dtype=float32, dropout=0.0, seed=0): the tiny model via kbit.load_model + LoRA."""
    from kbit.lora import add_lora
    from kbit.models.load import load_model

    def make(bits: int = 4, dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0):
        torch.manual_seed(seed)
        model = load_model(tiny_llama_dir, bits=bits, compute_dtype=dtype, device="cpu")
        add_lora(model, r=4, alpha=8, dropout=dropout, dtype=torch.float32)
        with torch.no_grad():  # B starts at zero; give it values so that every LoRA weight gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        return model

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run far faster on one thread than on two that wait for each other (and for a shared CI
    machine's other jobs); the thread count changes no result the tests compare within one process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny model's 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.ascii_letters + string.digits + " .,:-?!'"
    vocab = {tok: i for i, tok in enumerate(specials + list(chars))}
    assert len(vocab) <= 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def tiny_model_with_tokenizer(tiny_llama_dir, char_tokenizer, tmp_path):
    """The tiny model's folder plus the character tokenizer: what kbit.load_model / load_tokenizer read."""
    folder = tmp_path / "tiny-with-tokenizer"
    shutil.copytree(tiny_llama_dir, folder)
    char_tokenizer.save_pretrained(folder)
    return folder
