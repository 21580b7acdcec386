"""Several adapters on one base model, switched in place.

One set of LoRA layers serves every adapter. The active adapter's tensors are the layers' own parameters; the
others wait as plain tensors on the same device and in the same dtype. Switching swaps values, not objects: each
tensor is copied into the parameter that stays where it is, so anything holding the parameters (an optimizer, a
captured CUDA graph in :mod:`kbit.decode`) sees the new adapter, and switching back gives the same bits again. The
layers' scale (alpha / r) follows the adapter, so adapters may differ in alpha and rsLoRA; they must have the same
tensors (target layers, rank, DoRA, modules_to_save), which ``kbit.load_adapter`` checks when it adds one.

"base" (or ``None``) turns every LoRA layer off: each computes its base layer alone, as if no adapter were there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .inject import SETTINGS_ATTR, LoraSettings, lora_layers, lora_settings, saved_modules
from .layer import lora_scale

BASE = "base"  # the name that means "no adapter"
DEFAULT = "default"  # the name of an adapter made by add_lora or loaded without a name
ATTR = "_kbit_adapters"  # where a model keeps its AdapterSet


@dataclass
class _Adapter:
    settings: LoraSettings
    tensors: dict[str, torch.Tensor] | None  # None while its values are the live parameters


class AdapterSet:
    """The adapters of one model: their order, which one the parameters hold, and whether it is switched on."""

    def __init__(self, live: str, settings: LoraSettings) -> None:
        self.adapters: dict[str, _Adapter] = {live: _Adapter(settings, None)}
        self.live = live
        self.enabled = True


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter tensors by path: ``<layer>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``
    and each modules_to_save copy's state (``lm_head.weight``), in model order."""
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        tensors[f"{path}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{path}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            tensors[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for path, module in saved_modules(model):
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensors[f"{path}.{key}"] = tensor
    return tensors


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _registry(model: nn.Module) -> AdapterSet | None:
    """The model's AdapterSet, made on first use for a model with LoRA (its adapter is "default"); None without."""
    model = _unwrap(model)
    found = getattr(model, ATTR, None)
    if found is None and isinstance(getattr(model, SETTINGS_ATTR, None), LoraSettings):
        found = AdapterSet(DEFAULT, lora_settings(model))
        setattr(model, ATTR, found)
    return found


def start_adapters(model: nn.Module, name: str) -> None:
    """Name the adapter the model's LoRA layers were just made for (the first one loaded)."""
    model = _unwrap(model)
    setattr(model, ATTR, AdapterSet(name, lora_settings(model)))


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model``, in load order (empty without LoRA)."""
    found = _registry(model)
    return list(found.adapters) if found else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter ``model`` runs with, or None when it runs its base alone (or has no LoRA)."""
    found = _registry(model)
    return found.live if found and found.enabled else None


def _choices(model: nn.Module) -> str:
    names = list_adapters(model)
    return f"loaded: {', '.join(names)} (or {BASE!r} for none)" if names else "the model has no adapter loaded"


def check_adapter(model: nn.Module, name: str | None) -> None:
    """ValueError naming the loaded adapters unless ``name`` is one of them, "base" or None."""
    if name is not None and name != BASE and name not in list_adapters(model):
        raise ValueError(f"unknown adapter {name!r}; {_choices(model)}")


def check_new_name(model: nn.Module, name: str) -> None:
    """ValueError unless ``name`` can name a further adapter of ``model`` (not empty, not "base", not taken)."""
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"adapter name {name!r} is not allowed: use a non-empty name other than {BASE!r}")
    if name in list_adapters(model):
        raise ValueError(f"an adapter named {name!r} is already loaded ({_choices(model)}); give this one another name")


def add_adapter(model: nn.Module, name: str, settings: LoraSettings, tensors: dict[str, torch.Tensor]) -> None:
    """Keep ``tensors`` (keyed as :func:`adapter_tensors`, shapes already checked) as the inactive adapter ``name``."""
    check_new_name(model, name)
    live = adapter_tensors(_unwrap(model))
    if tensors.keys() != live.keys():
        raise ValueError(f"adapter {name!r} does not hold the same tensors as the adapters loaded before it")
    kept = {key: tensors[key].detach().to(device=t.device, dtype=t.dtype) for key, t in live.items()}
    _registry(model).adapters[name] = _Adapter(settings, kept)


@torch.no_grad()
def set_adapter(model: nn.Module, name: str | None) -> None:
    """Run ``model`` with adapter ``name`` from now on (``None`` or "base": the base model alone), copying in place."""
    model = _unwrap(model)
    found = _registry(model)
    if found is None:
        if name is None or name == BASE:
            return
        raise ValueError(f"unknown adapter {name!r}; {_choices(model)}")
    check_adapter(model, name)
    if name is None or name == BASE:
        saved = lora_settings(model).modules_to_save
        if saved:
            raise ValueError(
                f"the adapters replace {list(saved)} (modules_to_save) and kbit keeps no original of them, so the "
                "base model cannot run without an adapter"
            )
        _switch_on(model, found, False)
        return
    if name != found.live:
        incoming = found.adapters[name]
        for key, param in adapter_tensors(model).items():
            held = incoming.tensors[key]
            outgoing = param.detach().clone()
            param.copy_(held)
            held.copy_(outgoing)  # the buffer that held `name` now holds the adapter going out
        found.adapters[found.live].tensors, incoming.tensors = incoming.tensors, None
        found.live = name
        settings = incoming.settings
        scale = lora_scale(settings.r, settings.alpha, settings.use_rslora)
        for _, layer in lora_layers(model):
            layer.alpha, layer.scale = settings.alpha, scale
        setattr(model, SETTINGS_ATTR, settings)  # save_adapter writes the adapter that is active
    _switch_on(model, found, True)


def _switch_on(model: nn.Module, found: AdapterSet, on: bool) -> None:
    found.enabled = on
    for _, layer in lora_layers(model):
        layer.enabled = on


@contextlib.contextmanager
def adapter_active(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block ``model`` runs with adapter ``name`` ("base": none); the adapter active before comes back."""
    before = active_adapter(model)
    if name == before or (name in (None, BASE) and before is None):
        yield
        return
    set_adapter(model, name)
    try:
        yield
    finally:
        set_adapter(model, before)
