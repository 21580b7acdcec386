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


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct in NF4 + double quant, loaded once per session."""
    from kbit.models import load_model, load_tokenizer

    return load_model("default", device="cpu"), load_tokenizer("default")
