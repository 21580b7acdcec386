"""Load a Hugging Face causal LM with its linear layers quantized by kbit, streaming from safetensors.

The model skeleton is built with its parameters on the ``meta`` device (buffers such as rotary tables stay real),
then filled module by module straight from the safetensors shards: each linear weight is read, quantized and
dropped before the next is read, so peak host memory stays near one layer plus the quantized model, never the full
16-bit model. Checkpoints already quantized by transformers + bitsandbytes (``quantization_config`` in config.json)
load their packed bytes as they are. GGUF files go through transformers' GGUF reader (which dequantizes them whole)
and are quantized afterwards.

With ``on_layer`` the skeleton is filled one decoder layer at a time and the hook sees each layer as soon as it is
complete: kbit.dist adds LoRA to it and shards it there, so a rank never holds more than its shards plus one whole
layer (then the embeddings and head, filled last).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn import Linear4bit, Linear8bit
from ..quant import QuantState, quantize_4bit
from ..quant.blockwise4 import check_blocksize
from ..quant.codebooks import check_quant_type
from .default import default_model_path

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB", "weight_format")


@dataclass
class LoadConfig:
    """How a model was (or is to be) loaded; kept on the model as ``model.kbit_load_config``."""

    source: str
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8
    skip_modules: tuple[str, ...] = ("lm_head",)
    pre_quantized: bool = False
    skipped: list[str] = field(default_factory=list)  # linear layers left unquantized

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        if self.bits not in (4, 8, 16):
            raise ValueError(f"bits={self.bits!r} is not supported; use 4, 8 or 16")
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if self.compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute_dtype {self.compute_dtype} is not supported; use bfloat16, float16 or float32")

    def as_json(self) -> dict:
        """JSON-friendly form (dtypes as strings)."""
        d = asdict(self)
        for k in ("compute_dtype", "quant_storage"):
            d[k] = str(d[k]).removeprefix("torch.")
        return d


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    source: str | os.PathLike = "default",
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    device: str | torch.device | None = None,
    blocksize: int = 64,
    on_layer: Callable[[nn.Module, str], None] | None = None,
):
    """A transformers causal LM whose ``nn.Linear`` layers are kbit ``Linear4bit`` / ``Linear8bit`` (bits=16: none).

    ``source``: ``"default"`` (the embedded SmolLM2-135M-Instruct), a local folder (config.json + safetensors,
    sharded or not, or a transformers + bitsandbytes 4/8-bit checkpoint), a ``.gguf`` file, or a Hugging Face Hub id.
    ``on_layer(model, path)`` is called for each decoder layer (:func:`decoder_layer_paths`), in order, as soon as
    all its weights are loaded, then once with path ``""`` when the rest is (GGUF files: after the whole load).
    """
    cfg = LoadConfig(
        str(source),
        bits,
        quant_type,
        double_quant,
        blocksize,
        compute_dtype,
        quant_storage,
        tuple(skip_modules),
    )
    cfg.validate()
    device = torch.device(device) if device is not None else default_device()
    path = resolve_source(source)
    if path.is_file():
        model = _load_gguf(path, cfg, device)
        if on_layer is not None:  # transformers' GGUF reader loads everything at once: nothing to stream
            for layer in decoder_layer_paths(model):
                on_layer(model, layer)
            on_layer(model, "")
    else:
        model = _load_folder(path, cfg, device, on_layer)
    model.kbit_load_config = cfg
    model.config._name_or_path = str(source)
    model.eval()
    return model


def resolve_source(source: str | os.PathLike) -> Path:
    """A local file/folder for ``source``; Hub ids are downloaded (weights, config and tokenizer files only)."""
    if str(source) == "default":
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a model folder (config.json + safetensors)")
        return path
    looks_like_path = str(source).startswith((".", "/", "~")) or os.sep in str(source) and str(source).count("/") != 1
    if looks_like_path or str(source).endswith(".gguf"):
        raise FileNotFoundError(f"model {source!r} not found: no such file or folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=WEIGHT_PATTERNS))
    except Exception as e:  # offline, unknown id, gated repo: one line that says what to do
        raise FileNotFoundError(
            f"model {source!r} is not a local file or folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a local folder or a valid Hub id"
        ) from None


# ---- building the skeleton -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside go to the meta device; buffers (rotary tables) keep real values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        with _no_init():
            yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation: every parameter is overwritten from the checkpoint."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def _build_skeleton(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"architecture {getattr(config, 'architectures', None) or config.model_type!r} is not a causal LM that "
                "transformers implements; kbit loads any AutoModelForCausalLM architecture"
            ) from None
        raise


def quantized_module_names(model, cfg: LoadConfig) -> list[str]:
    """Names of the nn.Linear modules to quantize: all but the output embedding and ``skip_modules`` matches."""
    out_emb = model.get_output_embeddings()
    names = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is out_emb:
            continue
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in cfg.skip_modules):
            continue
        names.append(name)
    return names


def decoder_layer_paths(model: nn.Module) -> list[str]:
    """Paths of the model's repeated blocks: transformers' ``_no_split_modules`` classes, else the children of
    its longest ModuleList (works on a meta-device skeleton)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    paths = [p for p, m in model.named_modules() if p and type(m).__name__ in names]
    if not paths:
        lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        if lists:
            path, longest = max(lists, key=lambda pm: len(pm[1]))
            paths = [f"{path}.{i}" if path else str(i) for i in range(len(longest))]
    return paths


def _under(name: str, path: str) -> bool:
    """True when module/parameter ``name`` lies in module ``path`` ("" holds everything)."""
    return not path or name == path or name.startswith(path + ".")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---- safetensors folders -----------------------------------------------------------------------------------------


_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8,
    "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip


class _Shards:
    """Key -> tensor access over a folder's safetensors files, reading one tensor at a time.

    Tensors are read with plain file reads rather than through a memory map: mapped pages of the checkpoint would
    count towards the process's resident memory for as long as the files stay open, which defeats streaming.
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{folder} has no *.safetensors weights; "
                    "save the model with save_pretrained(safe_serialization=True)"
                )
        self.entries: dict[str, tuple[Path, int, str, list[int], int]] = {}
        for f in files:
            path = folder / f
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                try:
                    header = json.loads(fh.read(n))
                except json.JSONDecodeError:
                    raise ValueError(f"{path} is not a valid safetensors file (unreadable header)") from None
            for key, info in header.items():
                if key != "__metadata__":
                    start, end = info["data_offsets"]
                    self.entries[key] = (path, 8 + n + start, info["dtype"], info["shape"], end - start)
        self.where = {k: e[0] for k, e in self.entries.items()}
        self.alias: dict[str, str] = {}  # model name -> checkpoint name, for renamed legacy keys

    def add_renames(self, model) -> None:
        """Accept legacy checkpoint names (e.g. GPT-NeoX ``embed_out`` for ``lm_head``) as transformers does."""
        renames = _renamings(model)
        for key in self.where:
            new = key
            for src, tgt in renames:
                new = re.sub(src, tgt, new)
            if new != key and new not in self.where:
                self.alias[new] = key

    def __contains__(self, key: str) -> bool:
        return key in self.where or key in self.alias

    def get(self, key: str) -> torch.Tensor:
        key = key if key in self.where else self.alias[key]
        path, offset, dtype, shape, nbytes = self.entries[key]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {dtype}, which kbit cannot load")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf.numpy()) != nbytes:
                raise ValueError(f"{path} is truncated: tensor {key} is incomplete; download the file again")
        return buf.view(_ST_DTYPES[dtype]).reshape(shape)

    def keys(self) -> list[str]:
        return list(self.where)


def _renamings(model) -> list[tuple[str, str]]:
    """transformers' checkpoint key renamings for this model, as (regex, replacement); no tensor conversions."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:  # transformers 4.x: the families kbit targets need no renaming there
        return []
    return [
        (src, tgt)
        for t in get_model_conversion_mapping(model)
        if isinstance(t, WeightRenaming)
        for src, tgt in zip(t.source_patterns, t.target_patterns, strict=False)
    ]


def _checkpoint_key(shards: _Shards, key: str, prefix: str) -> str | None:
    """The checkpoint's name for model parameter ``key`` (checkpoints of the bare model lack ``prefix.``)."""
    if key in shards:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in shards:
        return key[len(prefix) + 1 :]
    return None


def _pre_quantization(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; kbit reads "
            "bitsandbytes 4-bit and 8-bit checkpoints or unquantized ones"
        )
    return qc


def _load_folder(folder: Path, cfg: LoadConfig, device: torch.device, on_layer=None):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
    config = AutoConfig.from_pretrained(folder)
    pre = _pre_quantization(config)
    if pre is not None:
        del config.quantization_config
        cfg.pre_quantized = True
        cfg.bits = 8 if pre.get("load_in_8bit") else 4
    model = _build_skeleton(config, cfg.compute_dtype)
    shards = _Shards(folder)
    shards.add_renames(model)
    targets = set(quantized_module_names(model, cfg)) if cfg.bits != 16 else set()
    names = sorted(targets | ({n for n, _ in model.named_modules()} if pre else set()))
    done: set[str] = set()
    # Without a hook everything is one group; with one, each decoder layer is filled and handed over in turn.
    layers = decoder_layer_paths(model) if on_layer is not None else []
    for layer in layers:
        _fill_linears(model, shards, [n for n in names if _under(n, layer)], targets, done, cfg, device, folder)
        _fill_parameters(model, shards, done, cfg, device, folder, under=layer)
        _move_buffers(model.get_submodule(layer), device)
        model.get_submodule(layer).requires_grad_(False)
        on_layer(model, layer)
    _fill_linears(model, shards, [n for n in names if f"{n}.weight" not in done], targets, done, cfg, device, folder)
    _fill_parameters(model, shards, done, cfg, device, folder)
    handed_over = tuple(f"{layer}." for layer in layers)  # frozen already; the hook may have added trainables
    for name, p in model.named_parameters():
        if not name.startswith(handed_over):
            p.requires_grad_(False)  # a loaded base model is frozen; LoRA adds the trainable parameters
    if on_layer is not None:
        on_layer(model, "")
    return model


def _fill_linears(model, shards: _Shards, names: list[str], targets: set[str], done: set[str], cfg, device, folder):
    """Quantize (or take pre-quantized) the weights of the nn.Linear modules ``names``, one at a time."""
    prefix = model.base_model_prefix
    for name in names:
        mod = model.get_submodule(name)
        if type(mod) is not nn.Linear:
            continue
        wkey = _checkpoint_key(shards, f"{name}.weight", prefix)
        if wkey is None and name not in targets:
            continue  # e.g. a tied lm_head: filled by tying below
        if wkey is None:
            raise ValueError(f"{folder}: no weight for {name} in the checkpoint; is it a checkpoint of this model?")
        bkey = _checkpoint_key(shards, f"{name}.bias", prefix) if mod.bias is not None else None
        bias = shards.get(bkey).to(device, cfg.compute_dtype) if bkey else None
        base = wkey[: -len(".weight")]
        if cfg.pre_quantized and (f"{base}.weight.absmax" in shards or f"{base}.SCB" in shards):
            new = _prequantized_linear(shards, base, bias, cfg, device)
        elif name in targets:
            new = _quantize_linear(shards.get(wkey), bias, cfg, device)
        else:
            continue
        _set_module(model, name, new)
        done.update({f"{name}.weight", f"{name}.bias"})


def _quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, cfg: LoadConfig, device: torch.device) -> nn.Module:
    # Cast to the model dtype first, as transformers + bitsandbytes do, so both quantize the same values.
    w = w.to(device, cfg.compute_dtype)
    if cfg.bits == 8:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return Linear8bit.from_linear(lin, compute_dtype=cfg.compute_dtype)
    packed, state = quantize_4bit(w, cfg.quant_type, cfg.blocksize, cfg.double_quant, cfg.quant_storage)
    return Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=cfg.compute_dtype)


def _prequantized_linear(shards: _Shards, base: str, bias, cfg: LoadConfig, device: torch.device) -> nn.Module:
    weight = shards.get(f"{base}.weight").to(device)
    if f"{base}.SCB" in shards:
        return Linear8bit.from_quantized(
            weight, shards.get(f"{base}.SCB").to(device), bias=bias, compute_dtype=cfg.compute_dtype
        )
    group = {k: shards.get(k) for k in shards.keys() if k.startswith(f"{base}.weight.")}
    state = QuantState.from_dict(group, device=device, where=f"{base}.weight")
    cfg.quant_type, cfg.blocksize, cfg.double_quant = state.quant_type, state.blocksize, state.nested
    cfg.quant_storage = weight.dtype
    return Linear4bit.from_quantized(weight, state, bias=bias, compute_dtype=cfg.compute_dtype)


def _fill_parameters(model, shards: _Shards, done: set[str], cfg: LoadConfig, device, where, under: str = "") -> None:
    """Load every remaining parameter (embeddings, norms, unquantized linears) and tie weights.

    ``under``: only the parameters of that module, and no tying or completeness check (a decoder layer).
    """
    prefix = model.base_model_prefix
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if name in done or param.device.type != "meta" or not _under(name, under):
            continue
        key = _checkpoint_key(shards, name, prefix)
        if key is None:
            if name in tied or _is_tied_output(model, name):
                continue
            raise ValueError(f"{where}: the checkpoint has no tensor for {name}; is it a checkpoint of this model?")
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        t = shards.get(key)
        t = t.to(device, cfg.compute_dtype) if t.is_floating_point() else t.to(device)
        mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
        done.add(name)
    if under:
        return
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config, "tie_embedding", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"{where}: no weights for {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    _move_buffers(model, device)


def _is_tied_output(model, name: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None
        and getattr(model.config, "tie_word_embeddings", False)
        and any(p is out.weight for n, p in model.named_parameters(remove_duplicate=False) if n == name)
    )


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[k] = b.to(device)


# ---- GGUF ----------------------------------------------------------------------------------------------------------


def _load_gguf(path: Path, cfg: LoadConfig, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its progress bars and dtype advice are noise here
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # GGUF weights arrive dequantized as plain tensors, but transformers keeps a GGUF quantizer marker that makes
    # save_pretrained, PEFT and Trainer refuse the model; drop it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    targets = quantized_module_names(model, cfg) if cfg.bits != 16 else []
    for name in targets:
        lin = model.get_submodule(name)
        bias = lin.bias.detach().to(device, cfg.compute_dtype) if lin.bias is not None else None
        _set_module(model, name, _quantize_linear(lin.weight.detach(), bias, cfg, device))
        del lin  # free the float weight before the next layer
    model.to(device=device, dtype=cfg.compute_dtype)  # kbit layers keep their packed bytes through dtype casts
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(source: str | os.PathLike = "default"):
    """The tokenizer (with chat template) that belongs to ``source``."""
    from transformers import AutoTokenizer

    path = resolve_source(source)
    if path.is_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)
