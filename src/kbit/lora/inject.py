"""Put LoRA on a model: choose the target layers by PEFT's name rules, wrap them in place, count what trains.

Targets follow PEFT so that adapter folders mean the same thing in both libraries:
- ``"all-linear"``: every linear-like layer except the output head (``model.get_output_embeddings()``);
- a list of names: a module matches a name when its full path equals it or ends with ``"." + name``;
- any other string: a regular expression that must match the full path (``re.fullmatch``).
Modules named in ``modules_to_save`` (and everything inside them) are never LoRA targets; they are replaced
by a trainable copy instead. Unlike PEFT, kbit keeps no frozen original beside that copy (for an 8B model's
head that saves 1 GB), so the adapter cannot be switched off for those modules, and the total parameter count
is PEFT's minus the original's (the same as PEFT's when the head was tied to the input embeddings).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layer import INITS, LoRALinear, base_weight, is_linear_like, is_quantized_linear

ALL_LINEAR = "all-linear"
# The attribute add_lora sets on the model; save_adapter reads it back.
SETTINGS_ATTR = "lora_settings"


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's hyper-parameters as add_lora received them (what adapter_config.json records)."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.target_modules, str):
            if not self.target_modules or not all(isinstance(n, str) and n for n in self.target_modules):
                raise ValueError(
                    f"target_modules must be {ALL_LINEAR!r} or a non-empty list of module names, "
                    f"got {self.target_modules!r}"
                )
        if not all(isinstance(n, str) and n for n in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")


def _matches(path: str, name: str) -> bool:
    """PEFT's rule for a listed name: the full path equals it or ends with '.' + name."""
    return path == name or path.endswith("." + name)


def _inside(path: str, roots: Sequence[str]) -> bool:
    """True when ``path`` is one of ``roots`` or lies below one."""
    return any(path == root or path.startswith(root + ".") for root in roots)


def _short_names(paths: Sequence[str]) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path in paths})


def _saved_roots(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the modules named by modules_to_save (outermost matches only)."""
    matched = [path for path, _ in model.named_modules() if path and any(_matches(path, n) for n in names)]
    return [path for path in matched if not _inside(path, [p for p in matched if p != path])]


def find_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Paths of the modules add_lora would wrap, in model order; ValueError for names matching nothing."""
    modules = dict(model.named_modules())
    linear = [path for path, module in modules.items() if path and is_linear_like(module)]
    excluded = _saved_roots(model, settings.modules_to_save)
    target = settings.target_modules

    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        get_head = getattr(model, "get_output_embeddings", None)  # transformers' way to name the LM head
        head = get_head() if callable(get_head) else None
        chosen = [path for path in linear if modules[path] is not head]
    else:
        if isinstance(target, str):
            chosen = [path for path in modules if path and re.fullmatch(target, path)]
            unmatched = [] if chosen else [target]
        else:
            chosen = [path for path in modules if path and any(_matches(path, n) for n in target)]
            unmatched = [n for n in target if not any(_matches(path, n) for path in modules if path)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; "
                f"its linear layers are named {_short_names(linear)}"
            )
        not_linear = [
            f"{path} ({type(modules[path]).__name__})" for path in chosen if not is_linear_like(modules[path])
        ]
        if not_linear:
            raise ValueError(f"LoRA wraps linear layers only; target_modules also matched {not_linear}")
    return [path for path in chosen if not _inside(path, excluded)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


class _DenseLinear(nn.Linear):
    """nn.Linear that, like kbit's quantized layers, computes in its own dtype and answers in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def _trainable_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A trainable copy for modules_to_save: a dense nn.Linear for a quantized layer, else a deep copy."""
    if is_quantized_linear(module):
        weight = base_weight(module, dtype)
        copied = _DenseLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            copied.weight.copy_(weight)
            if module.bias is not None:
                copied.bias.copy_(module.bias)
    else:
        # A deep copy also unties a head shared with the input embeddings, as PEFT's copy does.
        copied = copy.deepcopy(module)
    copied.requires_grad_(True)
    return copied


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "kaiming",
    modules_to_save: Sequence[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Wrap ``model``'s targeted linear layers in LoRALinear in place, freeze the rest, return ``model``."""
    settings = LoraSettings(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        use_rslora=use_rslora,
        use_dora=use_dora,
        init=init,
        modules_to_save=tuple(modules_to_save or ()),
    )
    return apply_lora(model, settings, dtype)


def apply_lora(model: nn.Module, settings: LoraSettings, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """add_lora with its arguments already gathered in a LoraSettings (adapter weights in ``dtype``)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; kbit holds one adapter per model")
    targets = find_targets(model, settings)
    if not targets:
        raise ValueError(f"target_modules={settings.target_modules!r} selects no layer of {type(model).__name__}")
    model.requires_grad_(False)
    for path in targets:
        layer = LoRALinear(
            model.get_submodule(path),
            settings.r,
            settings.alpha,
            settings.dropout,
            settings.use_rslora,
            settings.use_dora,
            settings.init,
            dtype,
        )
        _set_module(model, path, layer)
    for path in _saved_roots(model, settings.modules_to_save):
        _set_module(model, path, _trainable_copy(model.get_submodule(path), dtype))
    setattr(model, SETTINGS_ATTR, settings)
    return model


def target_names(model: nn.Module) -> list[str]:
    """The shortest PEFT target_modules list that selects exactly the wrapped layers (as PEFT saves it)."""
    wrapped = [path for path, _ in lora_layers(model)]
    others = [path for path, _ in model.named_modules() if path and not _inside(path, wrapped)]
    names: set[str] = set()
    for path in wrapped:
        parts = path.split(".")
        # Shortest suffix first: "q_proj" is kept unless some unwrapped module's path also ends with it.
        suffixes = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        names.add(next((s for s in suffixes if not any(_matches(o, s) for o in others)), path))
    return sorted(names)


def lora_settings(model: nn.Module) -> LoraSettings:
    """The settings add_lora put on ``model``; raises ValueError when it has none."""
    settings = getattr(model, SETTINGS_ATTR, None)
    if not isinstance(settings, LoraSettings):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter; call kbit.add_lora(model, ...) first")
    return settings


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for the trainable copies made for modules_to_save."""
    for path in _saved_roots(model, lora_settings(model).modules_to_save):
        yield path, model.get_submodule(path)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's get_nb_trainable_parameters counts them.

    A quantized layer counts its logical weight (in × out, plus bias) whatever its packed storage holds; that
    is what PEFT reports for bitsandbytes layers (packed numel × 2 × storage bytes for 4-bit, int8 numel for
    8-bit), so the totals agree across the libraries.
    Shared (tied) parameters count once.
    """
    seen: set[int] = set()

    def count(module: nn.Module) -> tuple[int, int]:
        if id(module) in seen:
            return 0, 0
        seen.add(id(module))
        trainable = total = 0
        if is_quantized_linear(module):
            total = module.in_features * module.out_features  # frozen: packed weights never train
            params = [module.bias] if module.bias is not None else []
            children: list[nn.Module] = []
        else:
            params = list(module.parameters(recurse=False))
            children = list(module.children())
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        for child in children:
            t, a = count(child)
            trainable, total = trainable + t, total + a
        return trainable, total

    return count(model)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print 'trainable params: X || all params: Y || trainable%: Z' (PEFT's wording)."""
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")
