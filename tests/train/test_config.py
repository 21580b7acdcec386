"""TrainConfig: defaults, YAML and flag parsing, validation messages, help, and the CLI's fast failure."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from kbit.train.cli import run_train
from kbit.train.config import KEYS, ConfigError, TrainConfig, build_config, check_paths, help_text, parse_cli


def config_from(argv: list[str]) -> TrainConfig:
    cli = parse_cli(argv)
    return build_config(cli.config_path, cli.overrides)


def test_defaults_are_valid_and_follow_transformers_names():
    c = TrainConfig()
    for key in (
        "output_dir",
        "max_steps",
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "warmup_ratio",
        "lr_scheduler_type",
        "max_grad_norm",
        "optim",
        "logging_steps",
        "save_steps",
        "eval_steps",
        "save_total_limit",
        "seed",
        "gradient_checkpointing",
        "model",
        "data",
        "eval_data",
        "format",
        "max_seq_len",
        "packing",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bits",
        "quant_type",
        "double_quant",
    ):
        assert key in KEYS
    assert c.bits == 4 and c.quant_type == "nf4" and c.double_quant and c.target_modules == "all-linear"


@pytest.mark.parametrize(
    "argv",
    [["--max_steps", "7"], ["--max-steps", "7"], ["--max_steps=7"], ["--max-steps=7"]],
)
def test_both_spellings_and_equals(argv):
    assert config_from(argv).max_steps == 7


def test_flag_types():
    c = config_from(
        [
            "--learning_rate",
            "2e-4",
            "--packing",
            "--no-double-quant",
            "--target_modules",
            "q_proj,v_proj",
            "--gradient_checkpointing",
            "auto",
            "--bf16",
            "false",
            "--eval_data",
            "none",
            "--resume",
            "--warmup_ratio=0.1",
            "--lora_alpha",
            "16",
        ]
    )
    assert c.learning_rate == 2e-4 and c.packing is True and c.double_quant is False
    assert c.target_modules == ["q_proj", "v_proj"]
    assert c.gradient_checkpointing is None and c.bf16 is False and c.eval_data is None
    assert c.resume is True and c.warmup_ratio == 0.1 and c.lora_alpha == 16.0
    assert config_from(["--packing", "false"]).packing is False
    assert config_from(["--resume", "runs/x/checkpoint-4"]).resume == "runs/x/checkpoint-4"


def test_yaml_then_flags_win(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("learning_rate: 2e-4\nmax-steps: 30\npacking: true\ntarget_modules: [q_proj, v_proj]\n")
    c = config_from([str(path), "--max_steps", "5"])
    assert c.learning_rate == 2e-4  # PyYAML reads 2e-4 as a string; it is converted
    assert c.max_steps == 5 and c.packing is True and c.target_modules == ["q_proj", "v_proj"]
    # --resume does not swallow a config file that follows it
    cli = parse_cli(["--resume", str(path)])
    assert cli.config_path == str(path) and cli.overrides["resume"] == "true"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lerning_rate", "1e-4"], "unknown option '--lerning_rate' (did you mean '--learning_rate'?)"),
        (["--max-step", "3"], "unknown option '--max-step' (did you mean '--max_steps'?)"),
        (["--zzz", "1"], "unknown option '--zzz'; `kbit train --help` lists every key"),
        (["--max_steps", "ten"], "max_steps: expected an integer, got 'ten'"),
        (["--max_steps", "2.5"], "max_steps: expected an integer, got '2.5'"),
        (["--packing", "maybe"], None),  # 'maybe' is not a boolean word: it is read as the config path
        (["--learning_rate", "-1"], "learning_rate: must be > 0, got -1.0"),
        (["--learning_rate", "fast"], "learning_rate: expected a number, got 'fast'"),
        (["--warmup_ratio", "1.5"], "warmup_ratio: must be in [0, 1), got 1.5"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size: must be at least 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: must be at least 1, got 0"),
        (["--bits", "3"], "bits: must be 4, 8 or 16, got 3"),
        (["--quant_type", "int4"], "quant_type: must be one of nf4, fp4, got 'int4'"),
        (
            ["--lr_scheduler_type", "step"],
            "lr_scheduler_type: must be one of cosine, linear, constant, got 'step'",
        ),
        (
            ["--optim", "sgd"],
            "optim: must be one of adamw, adamw_8bit, paged_adamw, paged_adamw_8bit, got 'sgd'",
        ),
        (["--max_steps", "0"], "max_steps: must be a positive number of steps, or -1"),
        (["--lora_dropout", "1"], "lora_dropout: must be in [0, 1), got 1.0"),
        (["--format", "csv"], "format: must be one of auto, messages"),
        (["--max_seq_len"], "--max_seq_len: needs a value (an integer)"),
        (["--eval_fraction", "0.1", "--eval_data", "x.jsonl"], "eval_fraction: give eval_data"),
        (
            ["--memory_plan", "fast"],
            "memory_plan: must be one of auto, speed, memory, full, none, selective, offload, got 'fast'",
        ),
        (
            ["--memory_plan", "none", "--gradient_checkpointing"],
            "memory_plan: none conflicts with gradient_checkpointing: true; set memory_plan alone "
            "(gradient_checkpointing true means full, false means none)",
        ),
        (["--memory_plan", "speed", "--gradient_checkpointing"], "memory_plan: speed conflicts with"),
        (["--memory-plan", "offload", "--no-gradient-checkpointing"], "memory_plan: offload conflicts with"),
    ],
)
def test_errors_name_the_key(argv, message):
    if message is None:
        with pytest.raises(ConfigError, match="config file 'maybe' not found"):
            config_from(argv)
        return
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        config_from(argv)
    assert time.perf_counter() - t0 < 1.0
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_memory_plan_key_and_what_gradient_checkpointing_means(tmp_path):
    assert TrainConfig().memory_plan == "auto"
    assert config_from(["--memory-plan", "offload"]).memory_plan == "offload"
    path = tmp_path / "job.yaml"
    path.write_text("memory_plan: memory\ngradient_checkpointing: true\n")  # agree: memory recomputes every layer
    c = config_from([str(path)])
    assert c.memory_plan == "memory" and c.to_dict()["memory_plan"] == "memory"
    assert TrainConfig(**c.to_dict()) == c
    cases = {  # (memory_plan, gradient_checkpointing) -> plan on cuda, plan on cpu
        ("auto", None): ("speed", "none"),
        ("auto", True): ("full", "full"),
        ("auto", False): ("none", "none"),
        ("selective", True): ("selective", "selective"),
        ("none", False): ("none", "none"),
        ("speed", None): ("speed", "speed"),
        ("offload", None): ("offload", "offload"),
    }
    for (plan, recompute), expected in cases.items():
        c = TrainConfig(memory_plan=plan, gradient_checkpointing=recompute)
        assert (c.resolved_memory_plan("cuda"), c.resolved_memory_plan("cpu")) == expected, (plan, recompute)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\nlerning_rate: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'lerning_rate' \(did you mean 'learning_rate'"):
        config_from([str(bad)])
    bad.write_text("max_steps: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: max_steps: expected an integer, got \[1, 2\]"):
        config_from([str(bad)])
    bad.write_text("max_steps: : :\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:1: not valid YAML"):
        config_from([str(bad)])


def test_python_api_is_validated_too():
    with pytest.raises(ConfigError, match="learning_rate: must be > 0"):
        TrainConfig(learning_rate=0)
    with pytest.raises(TypeError):
        TrainConfig(lerning_rate=1)  # a dataclass: Python reports unknown keyword arguments itself
    with pytest.raises(ConfigError, match="save_total_limit"):
        dataclasses.replace(TrainConfig(), save_total_limit=-1)


def test_missing_paths_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="data: no such file 'nope.jsonl'"):
        check_paths(TrainConfig(data="nope.jsonl"))
    with pytest.raises(ConfigError, match="model: no such file or folder './missing-model'"):
        check_paths(TrainConfig(model="./missing-model"))
    check_paths(TrainConfig())  # builtin data, default model


def test_help_documents_every_key_with_its_default(capsys):
    text = " ".join(help_text().split())  # the help is wrapped; compare with single spaces
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in text
    assert "(default: 0.0002)" in text and "(default: all-linear)" in text and "(default: cosine)" in text
    assert run_train(type("Args", (), {"train_argv": ["--help"]})()) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kbit train") and "--learning_rate FLOAT" in out and "--quick" in out


def test_cli_bad_key_is_one_line_and_exit_2(capsys):
    assert run_train(type("Args", (), {"train_argv": ["--lerning_rate", "1e-4"]})()) == 2
    err = capsys.readouterr().err
    assert err == "kbit train: error: unknown option '--lerning_rate' (did you mean '--learning_rate'?)\n"


def test_cli_subprocess_fails_fast():
    """The real command: one line on stderr, exit status 2, nothing heavy loaded (no transformers)."""
    code = (
        "import sys, time; t = time.perf_counter(); from kbit.cli import main; rc = main(sys.argv[1:]); "
        "assert 'transformers' not in sys.modules; print(f'{time.perf_counter() - t:.2f}'); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "--max-steps", "-5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kbit train: error: max_steps: must be a positive number of steps, or -1 to train num_train_epochs "
        "epochs, got -5"
    ]


def test_print_config(capsys):
    assert run_train(type("Args", (), {"train_argv": ["--quick", "--print-config", "--seed", "3"]})()) == 0
    out = capsys.readouterr().out
    assert "seed: 3\n" in out and "max_train_samples: 120\n" in out
