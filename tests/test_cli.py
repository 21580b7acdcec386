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


def _second_adapter(root, model):
    """Save another adapter (other B) for the tiny base to root / "b"; return a model holding only it."""
    torch.manual_seed(11)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, root / "b")
    return model


def test_prompts_file_with_several_adapters_answers_in_order(tiny):
    root, model, tok = tiny
    lines = [
        {"prompt": "One", "adapter": "b"},
        {"prompt": "Two"},
        {"prompt": "Three", "adapter": "base"},
        {"prompt": "Four", "adapter": "a"},
        {"prompt": "Five", "adapter": "b"},
    ]
    (root / "mixed.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    kw = dict(max_new_tokens=6)
    expected = {p: generate(model, tok, p, **kw) for p in ("Two", "Four")}  # adapter a, the first one
    expected["Three"] = generate(model, tok, "Three", adapter="base", **kw)
    _second_adapter(root, model)
    expected |= {p: generate(model, tok, p, **kw) for p in ("One", "Five")}
    adapters = ["--adapter", f"a={root / 'adapter'}", "--adapter", f"b={root / 'b'}"]
    base = ["generate", "--model", str(root / "base"), "--device", "cpu", "--max-new-tokens", "6"]
    rc = main([*base, *adapters, "--prompts", str(root / "mixed.jsonl"), "--out", str(root / "out.jsonl")])
    assert rc == 0
    rows = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["One", "Two", "Three", "Four", "Five"]
    assert rows[2]["adapter"] == "base" and "adapter" not in rows[1]
    assert {r["prompt"]: r["answer"] for r in rows} == expected
    assert len(set(expected.values())) >= 3


def test_adapter_errors_name_the_record_and_the_names(tiny, capsys):
    root, _, _ = tiny
    (root / "p.jsonl").write_text('{"prompt": "ok", "adapter": "a"}\n{"prompt": "x", "adapter": "c"}\n')
    base = ["generate", "--model", str(root / "base"), "--prompts", str(root / "p.jsonl")]
    assert main([*base, "--adapter", f"a={root / 'adapter'}", "--adapter", f"b={root / 'adapter'}"]) == 2
    assert "p.jsonl:2: adapter 'c' is not loaded; loaded: a, b (or 'base' for none)" in capsys.readouterr().err
    assert main([*base, "--adapter", f"a={root / 'adapter'}", "--adapter", f"a={root / 'adapter'}"]) == 2
    assert "--adapter: the name 'a' is given twice" in capsys.readouterr().err
    assert main(base) == 2
    assert "p.jsonl:1: adapter 'a' is not loaded; no --adapter was given" in capsys.readouterr().err


def test_chat_switches_adapters(tiny, monkeypatch, capsys):
    root, model, tok = tiny
    first = generate(model, tok, "Hi", max_new_tokens=8)
    second = generate(_second_adapter(root, model), tok, "Hi", max_new_tokens=8)
    assert first != second
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/adapter b\n/reset\nHi\n/adapter nope\n/adapter\n/exit\n"))
    chat = ["chat", "--model", str(root / "base"), "--device", "cpu", "--max-new-tokens", "8"]
    assert main([*chat, "--adapter", f"a={root / 'adapter'}", "--adapter", f"b={root / 'b'}"]) == 0
    out, err = capsys.readouterr()
    assert out.index(first) < out.index("adapter: b (loaded: a, *b, base)") < out.index(second)
    assert "unknown adapter 'nope'; loaded: a, b (or 'base' for none)" in err
