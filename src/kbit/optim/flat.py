"""Flat multi-tensor optimizer state: one buffer per state over many parameters, cut into tiles and chunks.

Why: one kernel launch per parameter costs launch and Python overhead per tensor (bitsandbytes' AdamW8bit
spends ~39 ms a step on the 448 LoRA tensors of Llama-3-8B, almost all of it overhead); one launch over all of
them pays it once. Each parameter's segment starts on a 256-element block, so global block ``j`` is absmax
entry ``j`` and elements ``[256 j, 256 j + 256)`` of every buffer.

Chunks (for the paged optimizer) are runs of consecutive tiles. They hold whole parameters, packed up to the
chunk size; a parameter larger than a chunk is cut at tile boundaries into chunks of its own. A *region* is
the block range whose state the paged optimizer stores contiguously: a chunk of whole parameters, or one large
parameter (all its chunks). So every parameter's state lies in one region, and a chunk of whole parameters is
one contiguous host range: one copy each way.

The optimizer's ``state[p]`` entries are views into these buffers, shaped as bitsandbytes shapes them
(``state1`` like the parameter, ``absmax1`` one float per block), so inspecting or saving them needs no
unpacking."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 256
TILE_BLOCKS = 4  # must equal the kernel's R (kbit.kernels.triton.adamw8bit.TILE_BLOCKS)


@dataclass(frozen=True)
class Chunk:
    """Tiles ``[tile0, tile1)``, covering global blocks ``[block0, block1)``, inside region ``region``."""

    tile0: int
    tile1: int
    block0: int
    block1: int
    region: int = 0


@dataclass
class FlatLayout:
    """Where each parameter's state lives in the flat buffers, and the tiles and chunks that cover them."""

    params: list[torch.Tensor]
    first_block: list[int]  # first global block of each parameter
    nblocks: int
    tiles: torch.Tensor  # int32 [ntiles, 2]: (parameter index, first block inside the parameter), on the device
    chunks: list[Chunk]
    regions: list[tuple[int, int]]  # [block0, block1) of each region, in order, covering every block once

    @property
    def max_chunk_blocks(self) -> int:
        """Blocks in the largest chunk."""
        return max(c.block1 - c.block0 for c in self.chunks)


def blocks_of(numel: int) -> int:
    """Number of 256-element blocks covering ``numel`` elements."""
    return -(-numel // BLOCK)


def _pack(nb: list[int], first: list[int], tile_start: list[int], cap: int) -> tuple[list[Chunk], list]:
    """Chunks of whole parameters up to ``cap`` blocks; a larger parameter cut into tile-aligned chunks."""
    chunks: list[Chunk] = []
    regions: list[tuple[int, int]] = []
    cap_tiles = max(cap // TILE_BLOCKS, 1)  # a piece of a large parameter: whole tiles, within the cap
    a, size = 0, 0  # current packed chunk: parameters [a, i), size blocks

    def close(b: int) -> None:
        if b > a:
            regions.append((first[a], first[b - 1] + nb[b - 1]))
            chunks.append(Chunk(tile_start[a], tile_start[b], *regions[-1], len(regions) - 1))

    for i, n in enumerate(nb):
        if n > cap:
            close(i)
            regions.append((first[i], first[i] + n))
            ntiles = -(-n // TILE_BLOCKS)
            pieces = -(-ntiles // cap_tiles)
            for j in range(pieces):  # tiles spread evenly over the pieces
                t0, t1 = j * ntiles // pieces, (j + 1) * ntiles // pieces
                lo, hi = t0 * TILE_BLOCKS, min(t1 * TILE_BLOCKS, n)
                chunks.append(
                    Chunk(tile_start[i] + t0, tile_start[i] + t1, first[i] + lo, first[i] + hi, len(regions) - 1)
                )
            a, size = i + 1, 0
        elif size + n > cap:
            close(i)
            a, size = i, n
        else:
            size += n
    close(len(nb))
    return chunks, regions


def build_layout(params: Sequence[torch.Tensor], device: torch.device, chunk_blocks: int | None = None) -> FlatLayout:
    """Lay ``params`` out back to back in 256-blocks and tile them; one chunk, or chunks of at most
    ``chunk_blocks`` blocks (see the module docstring)."""
    nb = [blocks_of(p.numel()) for p in params]
    nb_t = torch.tensor(nb, dtype=torch.int64)
    first_t = torch.cumsum(nb_t, 0) - nb_t
    ntiles = -(-nb_t // TILE_BLOCKS)
    owner = torch.repeat_interleave(torch.arange(len(params)), ntiles)  # [T] parameter of each tile
    tile_start_t = torch.cumsum(ntiles, 0) - ntiles
    local = (torch.arange(int(ntiles.sum())) - tile_start_t[owner]) * TILE_BLOCKS  # first block inside the param
    total = sum(nb)
    first = first_t.tolist()
    if chunk_blocks is None or chunk_blocks >= total:
        chunks, regions = [Chunk(0, len(owner), 0, total, 0)], [(0, total)]
    else:
        chunks, regions = _pack(nb, first, tile_start_t.tolist() + [len(owner)], chunk_blocks)
    tiles = torch.stack([owner, local], 1).to(torch.int32).to(device)
    return FlatLayout(list(params), first, total, tiles, chunks, regions)


class FlatStates:
    """Zero-initialised flat buffers ``{name: tensor}`` for a layout; per-block buffers hold one value a block.
    The whole layout is one chunk: one launch a step.

    ``pinned``: the buffers live in page-locked host memory and the kernel reads and writes them there, over the
    host link (CUDA maps every ``cudaHostAlloc`` allocation into the GPU's address space): the paged
    optimizers' ``transfer="mapped"``, which holds no state on the GPU and needs no copies or staging."""

    def __init__(
        self,
        layout: FlatLayout,
        specs: dict[str, tuple[torch.dtype, bool]],
        device: torch.device,
        pinned: bool = False,
    ):
        """``specs[name] = (dtype, per_element)``, in the kernel's order of state arguments."""
        self.layout = layout
        self.device = device
        self.pinned = pinned
        self.per_element = {name: per_el for name, (_, per_el) in specs.items()}
        where = dict(device="cpu", pin_memory=True) if pinned else dict(device=device)
        self.buffers = {
            name: torch.zeros(layout.nblocks * (BLOCK if per_el else 1), dtype=dtype, **where)
            for name, (dtype, per_el) in specs.items()
        }
        self.states = tuple(self.buffers.values())

    def view(self, name: str, i: int) -> torch.Tensor:
        """Parameter ``i``'s part of buffer ``name``: shaped like the parameter, or [blocks] for per-block ones."""
        p = self.layout.params[i]
        b0 = self.layout.first_block[i]
        if self.per_element[name]:
            return self.buffers[name][b0 * BLOCK : b0 * BLOCK + p.numel()].view(p.shape)
        return self.buffers[name][b0 : b0 + blocks_of(p.numel())]

    def run(self, launch) -> None:
        """``launch(states, chunk)`` once, on the buffers themselves."""
        launch(self.states, self.layout.chunks[0])

    def synchronize(self) -> None:
        """Wait for the kernels writing host buffers (device buffers need no wait: users read them in order)."""
        if self.pinned and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def adopt(storage, states: Sequence[dict]) -> None:
    """Copy the tensors already in ``states[i]`` into ``storage`` (FlatStates or PagedStates), then make
    ``states[i][name]`` its views."""
    for i, state in enumerate(states):
        for name in storage.per_element:
            view = storage.view(name, i)
            old = state.get(name)
            if old is not None:
                if old.numel() != view.numel():
                    raise ValueError(
                        f"optimizer state {name!r} of a parameter of shape {tuple(storage.layout.params[i].shape)}"
                        f" has {old.numel()} elements, expected {view.numel()}: the state dict does not belong to"
                        " these parameters"
                    )
                view.copy_(old.reshape(view.shape))
            state[name] = view


def upload_into(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Copy a small host table into ``dst`` on the current stream without blocking the host."""
    if dst.device.type != "cuda":
        dst.copy_(host)
        return
    # A pinned copy from torch's caching host allocator: kept alive (not reused) until the copy has run.
    dst.copy_(host.pin_memory(), non_blocking=True)


class ParamTable:
    """The kernel's int64 [n, 5] parameter table on the device: (param address, grad address or 0 = skip, numel,
    first block, scalar row). Uploaded again only when an address or a row changes."""

    def __init__(self, layout: FlatLayout, device: torch.device):
        """Static columns from ``layout``; the rest are filled by :meth:`update`."""
        n = len(layout.params)
        self.host = torch.zeros(n, 5, dtype=torch.int64)
        self.host[:, 2] = torch.tensor([p.numel() for p in layout.params], dtype=torch.int64)
        self.host[:, 3] = torch.tensor(layout.first_block, dtype=torch.int64)
        self.table = torch.zeros(n, 5, dtype=torch.int64, device=device)
        self.key: tuple | None = None

    def update(self, pptrs: tuple[int, ...], gptrs: tuple[int, ...], rows: tuple[int, ...]) -> None:
        """Set the address and row columns; copies to the device only if they changed since the last call."""
        key = (pptrs, gptrs, rows)
        if key == self.key:
            return
        self.host[:, 0] = torch.tensor(pptrs, dtype=torch.int64)
        self.host[:, 1] = torch.tensor(gptrs, dtype=torch.int64)
        self.host[:, 4] = torch.tensor(rows, dtype=torch.int64)
        upload_into(self.table, self.host)
        self.key = key


def scalar_row(
    betas: tuple[float, float], eps: float, lr: float, weight_decay: float, step: int, torch_order: bool
) -> list[float]:
    """Per-step scalars b1, 1-b1, b2, 1-b2, c2, eps, 1-lr·wd, -lr/c1 as the CPU ops compute them (doubles)."""
    b1, b2 = betas
    c1 = 1.0 - b1**step
    if torch_order:  # torch.optim.AdamW
        c2 = (1.0 - b2**step) ** 0.5
        step_neg = -(lr / c1)
    else:  # bitsandbytes
        c2 = math.sqrt(1.0 - b2**step)
        step_neg = -lr / c1
    decay = 1.0 - lr * weight_decay if weight_decay != 0 else 1.0
    return [b1, 1.0 - b1, b2, 1.0 - b2, c2, eps, decay, step_neg]


def synchronize(buckets: dict) -> None:
    """Wait until every flat bucket's pending copies and updates have finished."""
    for b in buckets.values():
        b.synchronize()


def standalone_state_dict(optimizer: torch.optim.Optimizer, buckets: dict) -> dict:
    """``optimizer``'s torch state dict after its flat buckets have synced, every state tensor a standalone copy."""
    synchronize(buckets)
    sd = torch.optim.Optimizer.state_dict(optimizer)
    sd["state"] = {
        k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in sd["state"].items()
    }
    return sd
