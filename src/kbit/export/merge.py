"""Merge a LoRA adapter into its base model and write a Hugging Face folder; report how faithful the result is.

The adapter was trained on the *quantized* base, so the merged weight is ``dequantize(W4) + s·B·A`` (DoRA: rescaled
rows), computed in float32 layer by layer and written in ``dtype`` (bf16 by default): the merged model computes what
the unmerged 4-bit + adapter model computes, up to bf16 rounding. ``bits=4`` requantizes the merged weights to the
base's 4-bit format (a transformers + bitsandbytes checkpoint); most of a small LoRA delta is then rounded away, which
is why PEFT's merge into a 4-bit base loses quality. Either way ``merge`` measures what it wrote against the unmerged
model on a fixed text (KL divergence per token and perplexity change) so the user sees the cost of each choice.

``quantize_model`` writes the same kind of 4-bit checkpoint from a base model without an adapter, reusing the
packed bytes as they are.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..lora import LoRALinear, is_quantized_linear
from ..models.load import LoadConfig, load_model, load_tokenizer
from ..nn import Linear4bit, Linear8bit
from ..quant import quantize_4bit
from ..quant.blockwise4 import view_storage
from .adapter import load_adapter
from .checkpoint import check_output_dir, write_hf_folder


@dataclass
class MergeReport:
    """Fidelity of a written model against the unmerged 4-bit + adapter model on the reference text."""

    out_dir: str
    bits: int
    tokens: int
    kl: float
    ppl_unmerged: float
    ppl_merged: float

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change of the written model."""
        return self.ppl_merged / self.ppl_unmerged - 1.0

    def line(self) -> str:
        """One human-readable line."""
        what = "bf16 merge" if self.bits == 16 else f"merge requantized to {self.bits}-bit"
        return (
            f"{what}: KL {self.kl:.2e} nats/token, perplexity {self.ppl_unmerged:.3f} -> {self.ppl_merged:.3f} "
            f"({100 * self.ppl_change:+.2f}%) on {self.tokens} tokens of reference text"
        )


def merge(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    bits: int = 16,
    overwrite: bool = False,
    base_bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    report: bool = True,
    report_tokens: int = 2048,
    device: str | torch.device | None = None,
) -> MergeReport | None:
    """Merge ``adapter_dir`` into ``base`` (loaded as it was trained: 4-bit by default) and write ``out_dir``."""
    if bits not in (4, 16):
        raise ValueError(f"bits={bits!r}: merge writes 16-bit (dtype) or 4-bit (requantized) models")
    check_output_dir(out_dir, overwrite)
    model = load_model(
        base,
        bits=base_bits,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=dtype,
        device=device,
    )
    load_adapter(model, adapter_dir, dtype=dtype)
    model.eval()
    cfg: LoadConfig = model.kbit_load_config
    config = _output_config(model, dtype, cfg if bits == 4 else None)
    tensors = merged_tensors(model, dtype, requantize=cfg if bits == 4 else None)
    write_hf_folder(out_dir, tensors, config, load_tokenizer(base), model.generation_config, overwrite)
    if not report:
        return None
    written = load_model(out_dir, bits=16 if bits == 16 else 4, compute_dtype=dtype, device=device)
    result = _fidelity(model, written, load_tokenizer(base), report_tokens)
    rep = MergeReport(str(out_dir), bits, result.tokens, result.kl, result.ppl_reference, result.ppl_candidate)
    (Path(out_dir) / "merge_report.json").write_text(json.dumps(asdict(rep) | {"ppl_change": rep.ppl_change}, indent=2))
    return rep


def quantize_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Write ``source`` as a 4-bit checkpoint that transformers + bitsandbytes load (``quantization_config``)."""
    check_output_dir(out_dir, overwrite)
    model = load_model(
        source,
        bits=4,
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype,
        device=device,
    )
    config = _output_config(model, compute_dtype, model.kbit_load_config)
    tensors = merged_tensors(model, compute_dtype, requantize=model.kbit_load_config)
    return write_hf_folder(out_dir, tensors, config, load_tokenizer(source), model.generation_config, overwrite)


def save_base(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model``'s bases without their adapters: its 4-bit layers as they are (a bitsandbytes checkpoint).

    For bases that exist only in memory, such as the one LoftQ initialisation quantizes, which its adapter needs.
    """
    quant = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    if quant is None:
        raise ValueError(f"{type(model).__name__} has no 4-bit layer; save_base writes 4-bit bases")
    cfg = getattr(model, "kbit_load_config", None) or LoadConfig("memory")
    layout = dict(quant_type=quant.quant_type, double_quant=quant.compress_statistics, blocksize=quant.blocksize)
    cfg = replace(cfg, bits=4, compute_dtype=quant.compute_dtype, quant_storage=quant.quant_storage, **layout)
    config = _output_config(model, quant.compute_dtype, cfg)
    tensors = merged_tensors(model, quant.compute_dtype, requantize=cfg, fold_adapters=False)
    return write_hf_folder(out_dir, tensors, config, tokenizer, model.generation_config, overwrite)


def merged_tensors(
    model: nn.Module, dtype: torch.dtype, requantize: LoadConfig | None = None, fold_adapters: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model with adapters folded in, one layer at a time, under the base model's names.

    Without ``requantize`` everything is written dense in ``dtype``. With it (a 4-bit checkpoint), 4-bit layers
    without an adapter keep their packed bytes (bitsandbytes keys) and adapted ones are quantized again.
    ``fold_adapters=False`` writes the bases alone, as they are (the adapters are dropped).
    """
    seen: set[int] = set()
    for name, module in _leaves(model):
        if isinstance(module, LoRALinear) and not fold_adapters:
            module = module.base_layer
        if isinstance(module, LoRALinear):
            base = module.base_layer
            w = module.merged_weight(torch.float32)
            if requantize is not None and is_quantized_linear(base):
                yield from _packed(name, w.to(dtype), requantize)
            else:
                yield f"{name}.weight", w.to(dtype)
            if base.bias is not None:
                yield f"{name}.bias", base.bias.detach().to(dtype)
        elif isinstance(module, (Linear4bit, Linear8bit)) and not (requantize and isinstance(module, Linear4bit)):
            yield f"{name}.weight", module.dequantize(torch.float32).to(dtype)
            if module.bias is not None:
                yield f"{name}.bias", module.bias.detach().to(dtype)
        elif isinstance(module, Linear4bit):
            sd: dict[str, torch.Tensor] = {}
            module._save_to_state_dict(sd, f"{name}.", keep_vars=False)
            for k, v in sd.items():
                yield k, v.to(dtype) if k.endswith(".bias") else v
        else:
            for pname, p in list(module._parameters.items()) + _persistent_buffers(module):
                if p is None or id(p) in seen:
                    continue  # tied weights (lm_head = embed_tokens) are written once
                seen.add(id(p))
                yield (
                    f"{name}.{pname}" if name else pname,
                    p.detach().to(dtype) if p.is_floating_point() else p,
                )


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters, not descending into LoRA wrappers or quantized layers."""
    stack = [("", model)]
    while stack:
        name, mod = stack.pop(0)
        yield name, mod
        if isinstance(mod, (LoRALinear, Linear4bit, Linear8bit)):
            continue
        stack[:0] = [(f"{name}.{n}" if name else n, c) for n, c in mod.named_children()]


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, b) for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set]


def _packed(name: str, w: torch.Tensor, cfg: LoadConfig) -> Iterator[tuple[str, torch.Tensor]]:
    packed, state = quantize_4bit(w, cfg.quant_type, cfg.blocksize, cfg.double_quant)
    yield f"{name}.weight", view_storage(packed, cfg.quant_storage)
    for k, v in state.as_dict(packed=True).items():
        yield f"{name}.weight.{k}", v


def _output_config(model, dtype: torch.dtype, quant: LoadConfig | None):
    """The model's config for the written folder: plain, or with a bitsandbytes ``quantization_config``."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quant is not None:
        from transformers import BitsAndBytesConfig

        skipped = _dense_linears(model) or ["lm_head"]
        config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=quant.quant_storage,
            llm_int8_skip_modules=skipped,
        ).to_dict()  # fmt: skip
    return config


def _dense_linears(model: nn.Module) -> list[str]:
    """Names of linear layers that a 4-bit checkpoint of ``model`` stores unquantized (the head, skipped layers)."""
    names = []
    for name, mod in _leaves(model):
        base = mod.base_layer if isinstance(mod, LoRALinear) else mod
        if type(base) is nn.Linear:
            names.append(name)
    return sorted(names)


def _fidelity(reference, candidate, tokenizer, n_tokens: int):
    from ..eval import compare_models, reference_text

    ids = tokenizer(reference_text(max_chars=8 * n_tokens), return_tensors="pt").input_ids[0, :n_tokens]
    return compare_models(reference, candidate, ids)
