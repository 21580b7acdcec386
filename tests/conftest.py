"""Shared fixtures: the ``device`` fixture runs a test on the CPU and on CUDA when one is present."""

import os

# bitsandbytes' CPU reference path wraps itself in torch.compile; compiling costs minutes on a 2-core CI machine
# and changes no value, so tests run it eagerly. Set before torch is imported.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(request):
    """A folder holding SmolLM2-135M-Instruct's tokenizer (chat template included), parsed from the GGUF once."""
    from kbit.models import default_model_path, load_tokenizer

    gguf = default_model_path()
    stat = gguf.stat()
    cached = request.config.cache.mkdir(f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}")
    if not (cached / "tokenizer_config.json").is_file():
        load_tokenizer("default").save_pretrained(cached)
    return cached


def save_tiny_llama(folder, tokenizer_dir=None, seed: int = 0, **overrides):
    """Save a tiny random LlamaForCausalLM (fp32) to ``folder``, with the tokenizer in ``tokenizer_dir`` if given."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=49152 if tokenizer_dir else 256, tie_word_embeddings=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(folder)
    if tokenizer_dir:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder)
    return model


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct in NF4 + double quant, loaded once per session."""
    from kbit.models import load_model, load_tokenizer

    return load_model("default", device="cpu"), load_tokenizer("default")
