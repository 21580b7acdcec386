"""Write a Hugging Face model folder (sharded safetensors + config + tokenizer) from a stream of tensors.

Used by ``merge`` (dense bf16 or requantized 4-bit) and ``quantize`` (a transformers + bitsandbytes 4-bit checkpoint).
Tensors arrive one at a time and are flushed shard by shard, so memory stays near one shard. The folder is written
under a temporary name beside the target and renamed into place at the end: an interrupted export never leaves a
folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty ``out_dir`` unless ``overwrite``; return it as a Path."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    return out


def write_hf_folder(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config,
    tokenizer=None,
    generation_config=None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write ``tensors`` as transformers-style shards, with ``config`` (and tokenizer), atomically into ``out_dir``."""
    out = check_output_dir(out_dir, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _write_shards(tmp, tensors, max_shard_bytes)
        _name_shards(tmp, files)
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[str]]:
    shard: dict[str, torch.Tensor] = {}
    size, files = 0, []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            files.append(_flush(folder, shard, len(files)))
            shard, size = {}, 0
        shard[name] = t.detach().to("cpu").contiguous()
        size += nbytes
    if shard or not files:
        files.append(_flush(folder, shard, len(files)))
    return files


def _flush(folder: Path, shard: dict[str, torch.Tensor], index: int) -> list[str]:
    save_file(shard, folder / f"shard-{index:05d}.safetensors", metadata={"format": "pt"})
    return list(shard)


def _name_shards(folder: Path, files: list[list[str]]) -> None:
    """Rename to transformers' names (model.safetensors, or model-0000i-of-0000n + index) once n is known."""
    n = len(files)
    if n == 1:
        os.replace(folder / "shard-00000.safetensors", folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, keys in enumerate(files):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        src = folder / f"shard-{i:05d}.safetensors"
        total += src.stat().st_size
        os.replace(src, folder / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
