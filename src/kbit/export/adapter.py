"""Adapter folders in PEFT's format: kbit writes them, and reads the ones kbit or PEFT wrote.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are PEFT's, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``lora_A`` [r, in], ``lora_B`` [out, r]),
DoRA's ``….lora_magnitude_vector`` [out] and modules_to_save copies as ``base_model.model.lm_head.weight``.
PEFT keeps an adapter name in its in-memory keys (``lora_A.default.weight``); files with it are read too.
Tensors are saved in the adapter's dtype (bf16 by default); PEFT casts them to its own on load.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..lora.adapters import DEFAULT, adapter_tensors, add_adapter, check_new_name, list_adapters, start_adapters
from ..lora.inject import SETTINGS_ATTR, LoraSettings, apply_lora, lora_settings, target_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the user's model)

# PEFT's in-memory keys carry the adapter name; a file saved from them reads as if saved without it.
_ADAPTER_NAME_INFIXES = [
    (re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$"), r".\1.weight"),
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), ".lora_magnitude_vector"),
    (re.compile(r"\.modules_to_save\.[^.]+\."), "."),
]
# PEFT options kbit does not implement, with the value that means "not used".
_UNSUPPORTED = {
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "target_parameters": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}
# Initialisations after which PEFT's adapter only fits a base whose weights PEFT also changed.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every name with "_orig_mod."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's live tensors under PEFT's file keys: LoRA A/B, DoRA magnitudes, modules_to_save."""
    model = _unwrap(model)
    lora_settings(model)  # raises a clear error for a model without LoRA
    return {PREFIX + key: tensor for key, tensor in adapter_tensors(model).items()}


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json content PEFT expects for ``model``'s adapter."""
    model = _unwrap(model)
    settings = lora_settings(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": target_names(model),
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "modules_to_save": list(settings.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True if settings.init == "kaiming" else settings.init,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write`` to a temporary file beside ``path``, then rename: readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s adapter as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; save_adapter needs a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty; pass overwrite=True to write into it")
    config = adapter_config(model, base_model_name_or_path)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in adapter_state_dict(model).items()}
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(directory / CONFIG_NAME, lambda p: p.write_text(text))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The parsed adapter_config.json of an adapter folder; FileNotFoundError names what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return json.loads(path.read_text())


def settings_from_config(config: dict, source: str | os.PathLike = CONFIG_NAME) -> LoraSettings:
    """LoraSettings for a PEFT adapter config; ValueError for PEFT features kbit does not implement."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {config.get('peft_type')!r}; kbit reads LoRA adapters only")
    for key, unused in _UNSUPPORTED.items():
        value = config.get(key)
        if value is not None and value != unused and value not in ([], {}):
            raise ValueError(f"{source}: {key}={value!r} is a PEFT option kbit does not support")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} changed the base weights when the adapter was made, so it "
            "does not fit the original base model; convert it to a plain LoRA with PEFT first"
        )
    init_name = "gaussian" if init == "gaussian" else "kaiming"  # the loaded weights replace them anyway
    target = config.get("target_modules")
    if not target:
        raise ValueError(f"{source}: target_modules is empty; kbit needs the names of the adapted layers")
    return LoraSettings(
        r=config.get("r", 8),  # PEFT's defaults for keys a hand-written config may omit
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=target if isinstance(target, str) else tuple(target),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        init=init_name,
        modules_to_save=tuple(config.get("modules_to_save") or ()),
    )


def _file_key(key: str) -> str:
    """A key as kbit saves it: PEFT prefix present, adapter name removed."""
    for pattern, replacement in _ADAPTER_NAME_INFIXES:
        key = pattern.sub(replacement, key)
    return key if key.startswith(PREFIX) else PREFIX + key


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, name: str | None = None
) -> nn.Module:
    """Load a PEFT-format LoRA folder into ``model``, first adding LoRA layers in ``dtype`` if it has none.

    Without ``name`` the folder's weights replace the active adapter's (a model without LoRA calls it "default").
    With ``name`` it is kept beside the adapters already loaded (the first one loaded is active; switch with
    ``kbit.set_adapter``), in the dtype of the loaded ones; it must adapt the same layers with the same rank.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        legacy = (directory / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is there: re-save the adapter as safetensors)" if legacy else ""
        raise FileNotFoundError(f"{weights} is missing{hint}")
    settings = settings_from_config(config, directory / CONFIG_NAME)
    target = _unwrap(model)
    if name is not None:
        check_new_name(target, name)
    current = getattr(target, SETTINGS_ATTR, None)
    beside = name is not None and current is not None  # a further adapter, kept beside the active one
    if current is None:
        try:
            apply_lora(target, settings, dtype)
        except ValueError as error:
            raise ValueError(f"adapter {directory} does not fit {type(target).__name__}: {error}") from error
        start_adapters(target, name or DEFAULT)
    elif not beside:
        mine = (current.r, current.alpha, current.use_rslora, current.use_dora)
        theirs = (settings.r, settings.alpha, settings.use_rslora, settings.use_dora)
        if mine != theirs:
            raise ValueError(
                f"the model already has LoRA (r, alpha, rslora, dora) = {mine} but {directory} holds {theirs}"
            )

    expected = adapter_state_dict(target)
    made_for = config.get("base_model_name_or_path") or "an unnamed base model"
    source = getattr(getattr(target, "kbit_load_config", None), "source", None)
    this = source or getattr(getattr(target, "config", None), "_name_or_path", None) or type(target).__name__
    other = f"the adapter was made for {made_for}, not for this model ({this})"
    loaded: dict[str, torch.Tensor] = {}
    raw: dict[str, str] = {}  # the file's own key of each, for messages
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            raw[_file_key(key)] = key
            loaded[_file_key(key)] = f.get_tensor(key)
    if beside:
        _check_beside(target, name, directory, loaded, expected, other)
        add_adapter(target, name, settings, {key.removeprefix(PREFIX): t for key, t in loaded.items()})
        return model
    for key, tensor in loaded.items():
        if key not in expected:
            raise ValueError(
                f"{weights}: {raw[key]!r} matches no LoRA layer or saved module of {type(target).__name__}; "
                f"{other}, or for other target_modules"
            )
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{weights}: {raw[key]!r} has shape {tuple(tensor.shape)} but the model's tensor has shape "
                f"{tuple(expected[key].shape)}; {other}"
            )
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{weights} lacks {len(missing)} tensors the model's adapter needs, e.g. {missing[:3]}")
    with torch.no_grad():  # copy only once every key checked out: a bad file leaves no half-loaded adapter
        for key, tensor in loaded.items():
            expected[key].copy_(tensor)
    return model


def _check_beside(
    model: nn.Module,
    name: str,
    directory: Path,
    loaded: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    other: str,
) -> None:
    """Raise unless ``loaded`` (file keys) has the shapes of the model's adapter tensors ``expected``.

    A tensor of a layer the model lacks, or of another width, means another base model; one layer more or fewer, or
    another rank, means an adapter unlike the loaded ones: the error names both adapters and the first such layer.
    """
    weights = directory / WEIGHTS_NAME
    modules = dict(model.named_modules())
    order = {path: i for i, path in enumerate(modules)}
    first = list_adapters(model)[0]

    def layer_of(key: str) -> str:
        local = key.removeprefix(PREFIX)
        return local.rsplit(".lora_", 1)[0] if ".lora_" in local else local.rsplit(".", 1)[0]

    keys = sorted(loaded.keys() | expected.keys(), key=lambda k: (order.get(layer_of(k), len(order)), k))
    for key in keys:
        layer = layer_of(key)
        if key in loaded and layer not in modules:
            raise ValueError(f"{weights}: {key!r} matches no layer of {type(model).__name__}; {other}")
        what = key.removeprefix(PREFIX + layer + ".")
        if key not in expected:
            why = f"{what} is in {name!r} but not in {first!r}"
        elif key not in loaded:
            why = f"{what} is in {first!r} but not in {name!r}"
        elif loaded[key].shape != expected[key].shape:
            theirs, mine = tuple(loaded[key].shape), tuple(expected[key].shape)
            rank_dim = {"lora_A.weight": 0, "lora_B.weight": 1}.get(what)
            if rank_dim is None or [d for i, d in enumerate(theirs) if i != rank_dim] != [
                d for i, d in enumerate(mine) if i != rank_dim
            ]:
                raise ValueError(
                    f"{weights}: {key!r} has shape {theirs} but the model's tensor has shape {mine}; {other}"
                )
            why = f"{what} is {theirs} in {name!r} but {mine} in {first!r} (another rank)"
        else:
            continue
        raise ValueError(
            f"adapter {name!r} ({directory}) does not match adapter {first!r} at {layer}: {why}; adapters loaded "
            "together need the same target modules, rank and DoRA setting"
        )
