"""The kbit command line: generate (one prompt and a prompts file), chat, quantize, merge, and its errors."""

import io
import json

import pytest
import torch
from kbit_testing import save_tiny_llama

from kbit.cli import main
from kbit.export import save_adapter
from kbit.generate import generate
from kbit.lora import add_lora, lora_layers
from kbit.models import load_model, load_tokenizer


@pytest.fixture
def tiny(tmp_path, smol_tokenizer_dir):
    """A tiny random model folder with SmolLM2's tokenizer, and an adapter for it with nonzero B."""
    save_tiny_llama(tmp_path / "base", smol_tokenizer_dir)
    model = load_model(tmp_path / "base", device="cpu")
    add_lora(model, r=4, dropout=0.0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path, model, load_tokenizer(tmp_path / "base")


def test_generate_one_prompt_equals_python_api(tiny, capsys):
    root, model, tok = tiny
    rc = main(
        [
            "generate",
            "--model",
            str(root / "base"),
            "--adapter",
            str(root / "adapter"),
            "--device",
            "cpu",
            "--prompt",
            "Name a colour.",
            "--max-new-tokens",
            "12",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == generate(model, tok, "Name a colour.", max_new_tokens=12)


def test_generate_prompts_file(tiny):
    root, model, tok = tiny
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "One"}\n\n{"messages": [{"role": "user", "content": "Two"}]}\n')
    rc = main(
        [
            "generate",
            "--model",
            str(root / "base"),
            "--adapter",
            str(root / "adapter"),
            "--device",
            "cpu",
            "--prompts",
            str(prompts),
            "--out",
            str(root / "answers.jsonl"),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (root / "answers.jsonl").read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == ["One", None]
    # decoded together by the static engine, each answer is the transformers engine's answer alone
    assert rows[0]["answer"] == generate(model, tok, "One", max_new_tokens=6, engine="transformers")
    two = [{"role": "user", "content": "Two"}]
    assert rows[1]["answer"] == generate(model, tok, two, max_new_tokens=6, engine="transformers")


def test_generate_bad_prompts_files(tiny, capsys):
    root, _, _ = tiny
    (root / "empty.jsonl").write_text("\n")
    assert main(["generate", "--model", str(root / "base"), "--prompts", str(root / "empty.jsonl")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    assert main(["generate", "--model", str(root / "base"), "--prompts", str(root / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_chat_keeps_history(tiny, monkeypatch, capsys):
    root, model, tok = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi\n/exit\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(root / "base"),
                "--adapter",
                str(root / "adapter"),
                "--device",
                "cpu",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    first = generate(model, tok, "Hi", max_new_tokens=8)
    assert out.count(first) == 2  # after /reset the same first turn gives the same answer


def test_quantize_and_merge_commands(tiny, capsys):
    root, _, _ = tiny
    assert main(["quantize", "--model", str(root / "base"), "--out", str(root / "q4"), "--device", "cpu"]) == 0
    assert json.loads((root / "q4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    merge = ["merge", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(root / "merged")]
    assert main([*merge, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bf16 merge: KL" in out and (root / "merged" / "model.safetensors").is_file()
    assert main(merge) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_adapter_for_another_model_is_refused(tiny, tmp_path, smol_tokenizer_dir, capsys):
    root, _, _ = tiny
    save_tiny_llama(tmp_path / "wide", smol_tokenizer_dir, hidden_size=96, intermediate_size=192)
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "wide"),
                "--adapter",
                str(root / "adapter"),
                "--prompt",
                "x",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "shape" in err and f"made for {root / 'base'}, not for this model ({tmp_path / 'wide'})" in err
