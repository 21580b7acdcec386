"""TrainConfig: every key of ``kbit train``, with its default, its help and its validation, in one dataclass.

YAML files and command-line flags only fill the dataclass in; ``__post_init__`` converts the values to the
declared types and checks them, so the Python API, YAML and the CLI reject the same mistakes with the same
one-line message naming the key. Key names follow transformers' ``TrainingArguments`` wherever it has one.
Nothing here imports torch or transformers: a bad config fails before anything heavy is loaded.
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
REPORT_TO = ("auto", "none", "tensorboard")
STRATEGIES = ("auto", "fsdp", "ddp", "none")
LORA_INITS = ("default", "loftq")
QUANT_TYPES = ("nf4", "fp4")
MEMORY_PLANS = ("auto", "speed", "memory", "full", "none", "selective", "offload")
_RECOMPUTING_PLANS = ("full", "selective", "offload", "memory")  # what gradient_checkpointing true agrees with
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key."""


def _key(default: Any, help: str, group: str) -> Any:
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "group": group}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run needs; ``TrainConfig()`` is a small generic run on the built-in task."""

    # ---- model ----
    model: str = _key(
        "default",
        "model to fine-tune: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging "
        "Face folder, a .gguf file or a Hub id",
        "model",
    )
    bits: int = _key(4, "weight bits of the frozen base: 4 (QLoRA), 8 or 16 (plain LoRA)", "model")
    quant_type: str = _key("nf4", "4-bit code: nf4 or fp4", "model")
    double_quant: bool = _key(True, "quantize the 4-bit block scales too (saves ~0.37 bits per weight)", "model")
    device: str = _key("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N", "model")
    # ---- LoRA ----
    lora_r: int = _key(16, "LoRA rank", "lora")
    lora_alpha: float = _key(32.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) * B A x", "lora")
    lora_dropout: float = _key(0.05, "dropout on the LoRA input", "lora")
    lora_init: str = _key(
        "default",
        "default (B = 0) or loftq: start LoRA from the 4-bit quantization residual (bits 4 only; the 4-bit base "
        "it makes is saved beside the adapter as base/, which the adapter must be used with)",
        "lora",
    )
    target_modules: str | list[str] = _key(
        "all-linear", "layers that get LoRA: all-linear, or names such as q_proj,v_proj", "lora"
    )
    # ---- data ----
    data: str = _key(
        "builtin",
        "training data: 'builtin' (the packaged date-to-ISO task) or a .jsonl/.json/.csv/.tsv/.parquet file",
        "data",
    )
    eval_data: str | None = _key(
        None,
        "held-out data (a file, or 'builtin'); default: the builtin eval "
        "split when data is builtin, else none (see eval_fraction)",
        "data",
    )
    eval_fraction: float = _key(
        0.0, "hold out this fraction of the training data for eval when eval_data is not given", "data"
    )
    format: str = _key(
        "auto",
        "record format: auto, messages, prompt_completion, question_answer, alpaca, sharegpt or text",
        "data",
    )
    max_seq_len: int = _key(512, "truncate (or pack) sequences to this many tokens", "data")
    packing: bool = _key(False, "pack several short examples into each sequence (no cross-attention)", "data")
    train_on_prompt: bool = _key(False, "also take the loss on prompt tokens, not only on answers", "data")
    max_train_samples: int | None = _key(
        None, "use at most this many training records (builtin: the number generated, default 800)", "data"
    )
    max_eval_samples: int | None = _key(None, "use at most this many eval records (builtin default: 100)", "data")
    # ---- training ----
    output_dir: str | None = _key(
        None, "where checkpoints, metrics and the adapter go; default runs/<run_name>", "training"
    )
    run_name: str | None = _key(None, "name of the run folder under runs/; default <job>-<date>-<time>", "training")
    num_train_epochs: float = _key(
        1.0, "passes over the training data (fractions allowed); ignored when max_steps > 0", "training"
    )
    max_steps: int = _key(-1, "optimizer steps to take; -1 trains num_train_epochs epochs", "training")
    per_device_train_batch_size: int = _key(8, "sequences per micro-batch", "training")
    per_device_eval_batch_size: int = _key(16, "sequences per eval batch", "training")
    gradient_accumulation_steps: int = _key(
        1,
        "micro-batches per optimizer step; the loss is normalized by the target tokens of all of them",
        "training",
    )
    learning_rate: float = _key(2e-4, "peak learning rate", "training")
    lr_scheduler_type: str = _key(
        "cosine", "learning-rate schedule after warmup: cosine, linear or constant", "training"
    )
    warmup_ratio: float = _key(0.0, "fraction of the steps spent warming the learning rate up from 0", "training")
    warmup_steps: int = _key(0, "warmup steps; overrides warmup_ratio when > 0", "training")
    optim: str = _key("adamw", "optimizer: adamw, adamw_8bit, paged_adamw or paged_adamw_8bit", "training")
    weight_decay: float = _key(0.0, "decoupled weight decay (AdamW)", "training")
    adam_beta1: float = _key(0.9, "AdamW beta1", "training")
    adam_beta2: float = _key(0.999, "AdamW beta2", "training")
    adam_epsilon: float = _key(1e-8, "AdamW epsilon", "training")
    max_grad_norm: float = _key(1.0, "clip the gradient norm to this; 0 disables clipping", "training")
    bf16: bool | None = _key(
        None,
        "bfloat16 compute with autocast; auto: on for CUDA GPUs with bf16, "
        "off on CPUs (where float32 matmuls are faster)",
        "training",
    )
    gradient_checkpointing: bool | None = _key(
        None,
        "recompute every layer's activations in backward (true: memory_plan full; false: memory_plan none); "
        "auto: memory_plan decides",
        "training",
    )
    memory_plan: str = _key(
        "auto",
        "what each decoder layer keeps for the backward: speed (keep the activations of as many layers as the "
        "free GPU memory holds at this batch and sequence length, recompute the rest, offload layer inputs to CPU "
        "memory only if even that does not fit; the choice is logged), memory (recompute every layer from inputs "
        "kept in pinned CPU memory: the smallest footprint), full (recompute every layer), none (keep "
        "everything), selective (keep matmul and attention outputs, recompute the cheap ops) or offload (full, "
        "inputs in CPU memory); auto: what gradient_checkpointing says when set, else speed on CUDA and none on CPU",
        "training",
    )
    fast_path: bool | None = _key(
        None,
        "fused kernels (RMSNorm, SwiGLU, RoPE, LM head + cross-entropy in chunks) for Llama, Mistral, Qwen2/3, "
        "Gemma2, Phi3; auto: on for CUDA, off on CPU (same values through the PyTorch reference, no speed-up)",
        "training",
    )
    cuda_graph: bool = _key(
        False,
        "capture each micro-batch shape's forward and backward in a CUDA graph after one eager run, then replay it: "
        "removes the host's launch overhead at small batches (on an H100: 2x for the 8B shape at 1 x 2048, 10x on "
        "the default job); one GPU, the fast path, lora_dropout 0; the optimizer, clipping and schedule stay eager",
        "training",
    )
    seed: int = _key(42, "seed of the data order, LoRA initialisation and dropout", "training")
    resume: bool | str = _key(
        False,
        "true: continue from the newest complete checkpoint in output_dir "
        "(or the newest run); a path: from that checkpoint",
        "training",
    )
    # ---- several GPUs (torchrun) ----
    strategy: str = _key(
        "auto",
        "under torchrun: fsdp (shard the 4-bit model per decoder layer), ddp (a whole model per rank, LoRA "
        "gradients all-reduced), none (one process); auto: none in one process, else ddp when the model takes "
        "under a third of a device's memory, else fsdp",
        "distributed",
    )
    cpu_offload: bool = _key(
        False,
        "strategy fsdp on CUDA: keep parameter shards, gradients and optimizer state in host memory",
        "distributed",
    )
    # ---- logging, evaluation, checkpoints ----
    logging_steps: int = _key(
        10, "log loss, learning rate, tokens/s and memory every this many steps (and at the first)", "logging"
    )
    eval_steps: int = _key(0, "evaluate every this many steps; 0: only at the end", "logging")
    eval_on_start: bool = _key(True, "evaluate before the first step (the 'before' numbers)", "logging")
    save_steps: int = _key(100, "checkpoint every this many steps; 0: only at the end", "logging")
    save_total_limit: int = _key(2, "keep the newest this many checkpoints; 0 keeps all", "logging")
    report_to: str = _key(
        "auto",
        "auto (TensorBoard when installed), tensorboard or none; metrics.jsonl and loss_curve.png are always written",
        "logging",
    )
    eval_accuracy_samples: int = _key(
        0,
        "answer this many eval prompts greedily before and after training "
        "and report exact-match accuracy (for checkable answers such as the "
        "builtin task); 0: off",
        "logging",
    )
    generation_max_new_tokens: int = _key(16, "token limit of those answers", "logging")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {rule}, got {getattr(self, key)!r}")

        def one_of(key: str, choices: tuple[str, ...]) -> None:
            need(getattr(self, key) in choices, key, f"must be one of {', '.join(choices)}")

        need(self.bits in (4, 8, 16), "bits", "must be 4, 8 or 16")
        one_of("quant_type", QUANT_TYPES)
        need(bool(_DEVICE.fullmatch(self.device)), "device", "must be auto, cpu, cuda or cuda:N")
        need(self.lora_r >= 1, "lora_r", "must be a positive integer")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        if self.cuda_graph and self.lora_dropout:
            raise ConfigError(
                "cuda_graph: needs lora_dropout: 0 (a replayed graph would reuse the captured dropout masks; "
                f"lora_dropout is {self.lora_dropout})"
            )
        one_of("lora_init", LORA_INITS)
        need(self.lora_init != "loftq" or self.bits == 4, "lora_init", "loftq needs bits: 4")
        need(bool(self.target_modules), "target_modules", "must name at least one layer (or be all-linear)")
        need(bool(self.data), "data", "must be 'builtin' or a data file")
        from ..data.formats import FORMATS  # pure Python, no model code

        one_of("format", ("auto", *FORMATS))
        need(0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        if self.eval_fraction and self.eval_data:
            raise ConfigError(f"eval_fraction: give eval_data ({self.eval_data!r}) or eval_fraction, not both")
        need(self.max_seq_len >= 2, "max_seq_len", "must be at least 2 tokens")
        for key in ("max_train_samples", "max_eval_samples"):
            need(
                getattr(self, key) is None or getattr(self, key) >= 1,
                key,
                "must be a positive integer or none",
            )
        need(
            self.run_name is None or ("/" not in self.run_name and self.run_name not in ("", ".", "..")),
            "run_name",
            "must be a plain folder name (use output_dir for a path)",
        )
        need(
            self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs),
            "num_train_epochs",
            "must be > 0",
        )
        need(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            "must be a positive number of steps, or -1 to train num_train_epochs epochs",
        )
        for key in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            need(getattr(self, key) >= 1, key, "must be at least 1")
        need(0 < self.learning_rate < math.inf, "learning_rate", "must be > 0")
        one_of("lr_scheduler_type", SCHEDULERS)
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        one_of("optim", OPTIMIZERS)
        one_of("memory_plan", MEMORY_PLANS)
        recompute = self.gradient_checkpointing
        if recompute is not None and self.memory_plan != "auto":
            agrees = self.memory_plan in _RECOMPUTING_PLANS if recompute else self.memory_plan == "none"
            if not agrees:
                raise ConfigError(
                    f"memory_plan: {self.memory_plan} conflicts with gradient_checkpointing: {str(recompute).lower()}; "
                    "set memory_plan alone (gradient_checkpointing true means full, false means none)"
                )
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.seed >= 0, "seed", "must be >= 0")
        one_of("strategy", STRATEGIES)
        need(self.logging_steps >= 1, "logging_steps", "must be at least 1")
        for key in ("eval_steps", "save_steps", "save_total_limit", "eval_accuracy_samples"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        one_of("report_to", REPORT_TO)
        need(self.generation_max_new_tokens >= 1, "generation_max_new_tokens", "must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as YAML would hold them."""
        return asdict(self)

    def resolved_memory_plan(self, device_type: str) -> str:
        """The memory plan to apply on a ``device_type`` device: ``memory_plan`` unless auto; then
        gradient_checkpointing's (true: full, false: none); then speed on CUDA and none elsewhere."""
        if self.memory_plan != "auto":
            return self.memory_plan
        if self.gradient_checkpointing is not None:
            return "full" if self.gradient_checkpointing else "none"
        return "speed" if device_type == "cuda" else "none"

    @property
    def warmup(self) -> str:
        return f"{self.warmup_steps} steps" if self.warmup_steps else f"{self.warmup_ratio:g} of the steps"


# ---- types -------------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (
            " or none" if type(None) in args else ""
        )
    if typing.get_origin(tp) is list:
        return "a list of names"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from Python, YAML or a flag) as type ``tp``; otherwise a ConfigError naming the key."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (
            value is None or isinstance(value, str) and value.lower() in ("none", "null", "auto")
        ):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    ok, converted = _convert(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    return converted


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
        return ok, list(value) if ok else None
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return True, value.lower() in _TRUE
        return False, None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d[\d_]*", value.strip()):
            return True, int(value)
        return False, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp}")


# ---- YAML, flags, merging ----------------------------------------------------------------------------------

KEYS = tuple(f.name for f in fields(TrainConfig))


def _check_known(keys: list[str], spelled: dict[str, str] | None = None) -> None:
    """ConfigError for the first unknown key, with the closest known key as a suggestion."""
    spelled = spelled or {}
    for key in keys:
        if key in KEYS:
            continue
        shown = spelled.get(key, key)
        prefix = "--" if shown.startswith("--") else ""
        near = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean '{prefix}{near[0]}'?)" if near else "; `kbit train --help` lists every key"
        raise ConfigError(f"unknown option '{shown}'{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The key: value mapping of a YAML config file, keys checked (values are checked by TrainConfig)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected 'key: value' lines, got a {type(raw).__name__}")
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    try:
        _check_known(list(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return raw


@dataclass
class CliArgs:
    """``kbit train``'s command line: the config file, the key overrides and the command's own flags."""

    config_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    help: bool = False
    print_config: bool = False


def parse_cli(argv: list[str]) -> CliArgs:
    """Parse ``[CONFIG.yaml] [--key value | --key=value | --flag | --no-flag ...]``; '-' and '_' are equal."""
    hints = typing.get_type_hints(TrainConfig)
    args = CliArgs()
    spelled: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            args.help = True
            continue
        if not token.startswith("--"):
            if args.config_path is not None:
                raise ConfigError(f"unexpected argument {token!r}: give one config file, then --key value flags")
            args.config_path = token
            continue
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if key in ("quick", "print_config") and not eq:
            setattr(args, key, True)
            continue
        if not eq and key.startswith("no_") and key[3:] in KEYS and _takes_bool(hints[key[3:]]):
            key, value, eq = key[3:], "false", "="
        _check_known([key], {key: f"--{name}"})
        if not eq:
            if i < len(argv) and _takes_value(hints[key], argv[i]):
                value = argv[i]
                i += 1
            elif _takes_bool(hints[key]):
                value = "true"
            else:
                raise ConfigError(f"--{name}: needs a value ({_describe(hints[key])})")
        args.overrides[key] = value
        spelled[key] = f"--{name}"
    return args


def _takes_bool(tp: Any) -> bool:
    return tp is bool or bool in typing.get_args(tp)


def _takes_value(tp: Any, token: str) -> bool:
    """Whether ``token`` after a ``--key`` is its value; a boolean flag takes only a boolean word (and
    ``--resume``, a flag or a path, takes anything but the config file)."""
    if token.startswith("--"):
        return False
    if not _takes_bool(tp):
        return True
    if token.lower() in _TRUE | _FALSE:
        return True
    if type(None) in typing.get_args(tp) and token.lower() in ("auto", "none", "null"):
        return True
    return str in typing.get_args(tp) and not token.endswith((".yaml", ".yml"))


def build_config(
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    preset: dict[str, Any] | None = None,
) -> TrainConfig:
    """TrainConfig from defaults < ``preset`` < the YAML file < ``overrides`` (later wins), validated."""
    values: dict[str, Any] = dict(preset or {})
    if config_path is not None:
        values.update(read_yaml(config_path))
    overrides = overrides or {}
    _check_known(list(overrides))
    values.update(overrides)
    where = "" if config_path is None else f"{config_path}: "
    try:
        return TrainConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def check_paths(config: TrainConfig) -> None:
    """ConfigError for data or model paths that do not exist (cheap checks, before loading anything)."""
    for key in ("data", "eval_data"):
        value = getattr(config, key)
        if value is not None and value != "builtin" and not Path(value).expanduser().is_file():
            raise ConfigError(f"{key}: no such file {value!r}; give a data file or 'builtin'")
    model = config.model
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if model != "default" and looks_local and not Path(model).expanduser().exists():
        raise ConfigError(f"model: no such file or folder {model!r}")
    if isinstance(config.resume, str) and not Path(config.resume).expanduser().is_dir():
        raise ConfigError(f"resume: no such checkpoint folder {config.resume!r}")


# ---- help --------------------------------------------------------------------------------------------------

_GROUPS = {
    "model": "model",
    "lora": "LoRA",
    "data": "data",
    "training": "training",
    "distributed": "several GPUs (launch with torchrun --nproc-per-node N -m kbit train ...)",
    "logging": "logging, evaluation and checkpoints",
}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def help_text(presets: dict[str, dict[str, Any]] | None = None) -> str:
    """``kbit train --help``: every key with its type, default and meaning, grouped; then the presets."""
    hints = typing.get_type_hints(TrainConfig)
    out: list[str] = []
    for group, title in _GROUPS.items():
        out.append(f"\n{title}:")
        for f in fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            head = f"  --{f.name} {_metavar(hints[f.name])}"
            body = f"{f.metadata['help']} (default: {_show(default)})"
            lines = textwrap.wrap(body, 110 - 36)
            if len(head) > 34:
                out.append(head)
                out.extend(" " * 36 + line for line in lines)
            else:
                out.append(head.ljust(36) + lines[0])
                out.extend(" " * 36 + line for line in lines[1:])
    for title, values in (presets or {}).items():
        out.append(f"\n{title}:")
        out.extend(
            textwrap.wrap(
                ", ".join(f"{k}={_show(v)}" for k, v in values.items()),
                108,
                initial_indent="  ",
                subsequent_indent="  ",
            )
        )
    return "\n".join(out)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return "|".join(_metavar(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return "NAMES"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}[tp]
