"""Checkpoints that are complete or absent: written under a temporary name, marked, then renamed.

A checkpoint is the folder ``checkpoint-<step>/`` holding

- the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), so any checkpoint
  loads with ``kbit.export.load_adapter`` or PEFT; a model without kbit LoRA layers gets its trainable
  parameters in ``trainable_parameters.safetensors`` instead;
- ``training_state.pt``: optimizer, scheduler, RNG states (torch CPU and CUDA, Python, NumPy), step and data
  position (see :class:`~kbit.train.loop.Trainer`);
- ``trainer_state.json``: the same step and position, readable;
- ``COMPLETE``: written last.

Everything is written into ``checkpoint-<step>.tmp-<pid>/`` with every file fsynced, then ``COMPLETE``, then
the folder is renamed (atomic on POSIX). A crash at any point leaves a ``.tmp-`` folder (removed by the next
run), and resuming only ever considers ``checkpoint-<step>/`` folders that have the marker. Rotation
unmarks a checkpoint before deleting it, so a half-deleted one never looks complete.

In a distributed run (:mod:`kbit.dist`) rank 0 makes and renames the folder, every rank writes its own files
into it between barriers (``sharded/`` with FSDP, ``rng-rank<r>.pt``), and the adapter is gathered from the
shards and written by rank 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..dist import DistContext
from ..dist.checkpoint import gather_trainable, save_adapter_gathered

MARKER = "COMPLETE"
STATE_NAME = "training_state.pt"
INFO_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable_parameters.safetensors"
_NAME = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and (path / MARKER).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders interrupted saves left behind (``checkpoint-*.tmp-*``, ``*.old-*``).

    Unmarked ``checkpoint-<step>`` folders are left alone (they may be another tool's) and never resumed from.
    """
    output_dir = Path(output_dir)
    removed = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        if path.is_dir() and (".tmp-" in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        _fsync(path)
    _fsync(folder)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    info: dict[str, Any],
    keep: int = 0,
    dist: DistContext | None = None,
    write_rank_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (module docstring) and keep the newest ``keep`` (0: all).

    With ``dist`` every rank must call it; ``write_rank_files(folder)`` runs on every rank.
    """
    ctx = dist or DistContext()
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp-{ctx.broadcast_object(os.getpid())}"  # rank 0's pid names it
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    try:
        _write_weights(model, tmp, ctx)
        if write_rank_files is not None:
            write_rank_files(tmp)
        ctx.barrier()  # every rank's files are in tmp
        if ctx.is_main:
            _finish(tmp, final, output_dir, step, state, info)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.is_main:
        rotate(output_dir, keep)
    ctx.barrier()  # no rank goes on (or resumes) before the checkpoint exists
    return final


def _finish(tmp: Path, final: Path, output_dir: Path, step: int, state: dict[str, Any], info: dict[str, Any]) -> None:
    """Rank 0: the shared files, fsync, the marker, then the atomic rename."""
    torch.save(state, tmp / STATE_NAME)
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    _fsync_tree(tmp)
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if final.exists():  # saved again at the same step (e.g. after a resume): swap, then drop the old one
        old = output_dir / f"checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(output_dir)


def _write_weights(model: torch.nn.Module, folder: Path, ctx: DistContext) -> None:
    """The adapter (PEFT format) or the trainable parameters, full tensors gathered from every rank."""
    from ..lora.inject import SETTINGS_ATTR

    if getattr(getattr(model, "_orig_mod", model), SETTINGS_ATTR, None) is not None:
        save_adapter_gathered(model, folder, ctx)
        return
    from safetensors.torch import save_file

    tensors = gather_trainable(model)  # a collective under FSDP: every rank takes part
    if ctx.is_main:
        save_file(tensors, str(folder / TRAINABLE_NAME), metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy a checkpoint's adapter (or trainable parameters) into ``model``, which has the same layout."""
    folder = Path(folder)
    if (folder / TRAINABLE_NAME).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / TRAINABLE_NAME))
        params = dict(model.named_parameters())
        missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(tensors))
        if missing or not set(tensors) <= set(params):
            raise ValueError(f"{folder}: its parameters do not match the model's trainable ones ({missing[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        return
    from ..export.adapter import load_adapter

    load_adapter(model, folder)


def rotate(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (keep=0: delete none)."""
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[:-keep]] if keep > 0 else []
    for path in doomed:
        (path / MARKER).unlink(missing_ok=True)  # unmark first: a half-deleted checkpoint must not look complete
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---- random number generators ------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form torch.load(weights_only=True) accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The training state of a complete checkpoint; ValueError for a folder that is not one."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete checkpoint (no {MARKER} marker); pick another one")
    return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
