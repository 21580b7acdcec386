"""The embedded default job in its --quick (CI) setting, on the real SmolLM2-135M-Instruct in NF4 + double
quant: the eval loss falls, the task accuracy rises, and the run folder holds adapter, metrics, plot and
summary."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from kbit.train.cli import run_train


@pytest.mark.slow
def test_default_job_quick(tmp_path, capsys):
    run = tmp_path / "default-quick"
    assert run_train(Namespace(train_argv=["--quick", "--output_dir", str(run)])) == 0
    out = capsys.readouterr().out

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 15 and summary["stopped_by"] is None
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]  # measured: 1.49 -> 0.04
    assert summary["accuracy_after"] > summary["accuracy_before"]  # measured: 0/16 -> 14/16
    assert summary["config"]["bits"] == 4 and summary["config"]["double_quant"] is True
    assert summary["config"]["quant_type"] == "nf4" and summary["config"]["lora_r"] == 16

    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss_curve.png",
        "summary.json",
        "checkpoint-15/COMPLETE",
    ):
        assert (run / name).is_file(), name
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 15]
    assert "eval loss" in out and "accuracy (16 held-out)" in out and "before:" in out and "after:" in out


def test_answers_are_batched_with_a_tokenizer_that_has_no_padding_token(make_model, char_tokenizer):
    """Prompts of different lengths are left-padded with the end-of-text token when the tokenizer has no padding
    token (Llama 3's; the GGUF SmolLM2 tokenizer under transformers 5.17), and the tokenizer is left as it was."""
    from kbit.train.default_job import answer_prompts

    tok = char_tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.pad_token = None
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
               for q in ("a", "hello there")]  # fmt: skip
    answers = answer_prompts(make_model(), tok, records, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert tok.pad_token is None and tok.padding_side == "right"
