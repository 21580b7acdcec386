"""Export a Hugging Face llama-family folder (a merged model) to one GGUF file, for llama.cpp and its tools.

What is written follows llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM`` and
``MistralForCausalLM`` (both are llama.cpp's ``llama`` architecture), so its files load where theirs do:

- tensor names come from gguf's map (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
  ``lm_head`` becomes ``output`` and is left out when the embeddings are tied;
- the rows of the Q and K projections are permuted per head from Hugging Face's rotary layout (first half /
  second half of each head) to llama.cpp's (interleaved pairs); transformers' GGUF loader applies the inverse;
- 1-D tensors (norms, biases) are F32; matrices are F16, BF16 or Q8_0 (blocks of 32 along a row, one fp16
  scale each); a matrix whose rows are not a multiple of 32 is written F16 instead, with a warning, as
  llama.cpp does;
- the byte-level BPE tokenizer (``tokenizer.json``) becomes ``tokenizer.ggml.*`` metadata, with its
  pre-tokenizer named the way llama.cpp knows it, the special token ids and the chat template.

Not carried over, as in llama.cpp: Mistral's ``sliding_window`` (the llama architecture attends to the whole
context). Rope scaling "linear" and "llama3" are written for llama.cpp, but transformers' GGUF loader reads
neither back.

Memory stays near one tensor: shapes come from the safetensors headers, so the header, metadata and tensor
table are written first (``GGUFWriter.add_tensor_info``), then each tensor is read, converted and written on
its own (``write_tensor_data``) instead of being buffered until the end as ``add_tensor`` does. Exporting
SmolLM2-135M from fp32 safetensors (538 MB) peaks ~230 MB above the interpreter: about twice its largest
tensor (the 49152 x 576 embedding) in fp32, plus the vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# out_type -> (type of the matrices, general.file_type)
OUT_TYPES = {
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# tokenizer.json Split regexes -> llama.cpp's pre-tokenizer names (src/llama-vocab.cpp)
_SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}
# every block of a llama model has these
BLOCK_TENSORS = tuple("attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down".split())


@dataclass(frozen=True)
class _Planned:
    """One tensor of the output: its GGUF name, where it comes from, its shape (rows, cols) and its type."""

    name: str
    source: str | None  # safetensors key; None for a tensor computed from the config (rope_freqs)
    path: Path | None  # the safetensors file holding it
    shape: tuple[int, ...]
    qtype: QType
    heads: int | None = None  # Q/K rows are permuted to llama.cpp's rotary layout with this many heads

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * self.shape[-1] // block * type_size


def export_gguf(
    model_dir: str | os.PathLike, out_file: str | os.PathLike, out_type: str = "f16", overwrite: bool = False
) -> Path:
    """Write the llama-family Hugging Face folder ``model_dir`` as the GGUF file ``out_file``; return it.

    ``out_type``: "f16", "bf16" (matrices in that type) or "q8_0" (matrices 8-bit, ~8.5 bits/weight). The
    file is written beside ``out_file`` under a temporary name and renamed when complete; an existing
    ``out_file`` is refused unless ``overwrite``.
    """
    folder, out = Path(model_dir), Path(out_file)
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type={out_type!r}: GGUF export writes one of {sorted(OUT_TYPES)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; export_gguf reads a Hugging Face model folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another path or pass overwrite=True")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} (the folder of {out.name}) does not exist")
    config = _read_json(folder / "config.json")
    _check_supported(folder, config)
    matrix_type, file_type = OUT_TYPES[out_type]

    plan = _plan(folder, config, _tensor_index(folder), matrix_type)
    # All metadata first: a folder the export cannot handle fails before any file is created.
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_model_metadata(writer, folder, config, file_type)
    _add_tokenizer_metadata(writer, folder, config)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)

    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:  # one tensor in memory at a time
            tensor = _read_tensor(p.path, p.source) if p.source else _llama3_rope_factors(config)
            writer.write_tensor_data(_encode(tensor, p))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing; export_gguf needs a folder written by save_pretrained")
        return {}
    return json.loads(path.read_text())


def _check_supported(folder: Path, config: dict) -> None:
    arch = (config.get("architectures") or [config.get("model_type")])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{folder}: architecture {arch!r} cannot be exported to GGUF; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if "quantization_config" in config:
        raise ValueError(
            f"{folder} holds a quantized checkpoint ({config['quantization_config'].get('quant_method')})"
            "; export a 16-bit folder instead (kbit merge with bits=16)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{folder}: hidden_act={config['hidden_act']!r}; llama.cpp's llama architecture uses silu")


def _rope(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from transformers 5's ``rope_parameters`` / 4.x's ``rope_scaling``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0))), params


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _tensor_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """safetensors key -> (its file, its shape), from the headers alone."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        paths = sorted({folder / name for name in _read_json(index)["weight_map"].values()})
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"{folder} has no .safetensors weights; re-save the model with save_pretrained "
            "(pytorch_model.bin is not read)"
        )
    tensors = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            tensors.update({key: (path, tuple(f.get_slice(key).get_shape())) for key in f.keys()})
    return tensors


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    # Opened per tensor: a file kept open keeps every page read so far mapped, and the process would end up
    # holding the whole model in its resident memory.
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _plan(folder: Path, config: dict, tensors: dict, matrix_type: QType) -> list[_Planned]:
    """Every output tensor in file order, named, shaped and typed, from the safetensors headers alone."""
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"],
    }
    tied = config.get("tie_word_embeddings", False)
    plan = []
    _, rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) == "llama3":
        plan.append(_Planned("rope_freqs.weight", None, None, (_head_dim(config) // 2,), QType.F32))
    for key, (_, shape) in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same tensor as token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{folder}: tensor {key!r} has no GGUF name for a {n_layers}-layer llama model")
        qtype = QType.F32 if len(shape) == 1 else matrix_type
        if qtype == QType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QType.Q8_0][0]:
            warnings.warn(
                f"{key}: rows of {shape[-1]} are not a multiple of 32, written as F16 instead of Q8_0",
                stacklevel=3,
            )
            qtype = QType.F16
        plan.append(_Planned(name, key, tensors[key][0], shape, qtype, heads.get(name.split(".")[-2])))
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    expected |= {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in BLOCK_TENSORS}
    missing = expected - {p.name for p in plan}
    if missing:
        raise ValueError(f"{folder}: the weights lack {len(missing)} tensors llama.cpp needs, e.g. {min(missing)}")
    return sorted(plan, key=_file_order)


def _file_order(p: _Planned) -> tuple:
    """rope_freqs, token_embd, the blocks in order, output_norm, output: llama.cpp's usual order."""
    parts = p.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), p.name)
    return (0 if parts[0] in ("rope_freqs", "token_embd") else 2, 0, p.name)


def _encode(tensor: torch.Tensor, p: _Planned) -> np.ndarray:
    """The tensor as the file stores it: to fp32, permuted if Q/K, converted by gguf's quantizers."""
    w = tensor.to(torch.float32).numpy()
    if p.heads is not None:
        w = rotary_halves_to_interleaved(w, p.heads)
    return gguf.quants.quantize(w, p.qtype)


def rotary_halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute Q/K output rows (or biases) per head from HF's rotary layout to llama.cpp's (its ``permute``).

    Within each head of ``d`` rows, HF rotates row i with row i + d/2; llama.cpp rotates rows 2i and 2i + 1,
    so row i goes to 2i and row i + d/2 to 2i + 1. transformers' ``LlamaTensorProcessor`` undoes exactly this.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama 3.1 rope scaling as llama.cpp stores it: per frequency, the divisor of the unscaled frequency."""
    theta, rope = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = (
        rope.get("factor", 8.0),
        rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0),
    )
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two wavelengths: interpolate
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs), factors)  # short: unscaled
    return torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), factors)  # long: / factor


def _add_model_metadata(writer: gguf.GGUFWriter, folder: Path, config: dict, file_type: int) -> None:
    theta, rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{folder}: rope scaling {rope_type!r} is not exported; supported: default, linear, llama3")
    writer.add_name(folder.resolve().name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(config))
    if config.get("head_dim"):  # llama.cpp otherwise assumes hidden_size / heads
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    """A byte-level BPE ``tokenizer.json`` (+ tokenizer_config.json, chat template) as a "gpt2" vocab."""
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'tokenizer.json'} is missing; save the tokenizer into the model folder "
            "(tokenizer.save_pretrained(folder)): GGUF files carry their tokenizer"
        )
    spec = _read_json(folder / "tokenizer.json")
    tok_config = _read_json(folder / "tokenizer_config.json", required=False)
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model["type"] != "BPE" or not byte_level:
        raise ValueError(
            f"{folder / 'tokenizer.json'}: a {model['type']} tokenizer without byte-level pre-tokenization;"
            " GGUF export supports byte-level BPE (GPT-2 style) tokenizers only"
        )

    vocab_size = config["vocab_size"]
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        _check_id(folder, token, i, vocab_size)
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        token, i = added["content"], added["id"]
        _check_id(folder, token, i, vocab_size)
        looks_special = token.startswith("<|") and token.endswith("|>")
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if added["special"] or looks_special else gguf.TokenType.USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # rows with no token

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(folder, spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    ids = {t: i for i, t in enumerate(tokens)}
    for kind, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token = tok_config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        token_id = ids.get(token) if token is not None else None
        if token_id is None:  # as llama.cpp: tokenizer_config.json first, then config.json
            token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = _adds_bos_eos(spec, tok_config)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = _chat_template(folder, tok_config)
    if template:
        writer.add_chat_template(template)


def _check_id(folder: Path, token: str, i: int, vocab_size: int) -> None:
    if not 0 <= i < vocab_size:
        raise ValueError(f"{folder}: token {token!r} has id {i}, outside the model's vocab_size {vocab_size}")


def _pre_tokenizer_name(folder: Path, pre: dict | None) -> str:
    """llama.cpp's name for how ``tokenizer.json`` splits text before BPE (unknown names fail there too)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[0].get("invert"):
        name = _SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None and steps[0].get("behavior") == "Isolated":
            return name
    raise ValueError(
        f"{folder / 'tokenizer.json'}: pre-tokenizer {kinds} is not one kbit can name for llama.cpp "
        "(known: GPT-2's ByteLevel, SmolLM's digits + ByteLevel, the Llama 3 / Qwen2 / Tekken splits)"
    )


def _adds_bos_eos(spec: dict, tok_config: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: tokenizer_config's flags, else the post-processor's template."""
    single = (spec.get("post_processor") or {}).get("single") or []
    sequence_at = next((i for i, step in enumerate(single) if "Sequence" in step), 0)
    special_at = [i for i, step in enumerate(single) if "SpecialToken" in step]
    add_bos = tok_config.get("add_bos_token", any(i < sequence_at for i in special_at))
    add_eos = tok_config.get("add_eos_token", any(i > sequence_at for i in special_at))
    return bool(add_bos), bool(add_eos)


def _chat_template(folder: Path, tok_config: dict) -> str | list[dict[str, str]] | None:
    """The chat template(s): transformers 5 writes chat_template.jinja (+ additional_chat_templates/),
    4.x puts it in tokenizer_config.json."""
    default = tok_config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        default = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        default = _read_json(folder / "chat_template.json")["chat_template"]
    named = [
        {"name": p.stem, "template": p.read_text()}
        for p in sorted((folder / "additional_chat_templates").glob("*.jinja"))
    ]
    if not named:
        return default
    if isinstance(default, str):
        named.insert(0, {"name": "default", "template": default})
    return named + (default if isinstance(default, list) else [])
