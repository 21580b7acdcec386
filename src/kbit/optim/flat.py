"""Flat multi-tensor optimizer state: one buffer per state over many parameters, cut into tiles and chunks.

Why: one kernel launch per parameter costs launch and Python overhead per tensor (bitsandbytes' AdamW8bit
spends ~39 ms a step on the 448 LoRA tensors of Llama-3-8B, almost all of it overhead); one launch over all of
them pays it once. Each parameter's segment starts on a 256-element block, so global block ``j`` is absmax
entry ``j`` and elements ``[256 j, 256 j + 256)`` of every buffer, and a run of consecutive tiles is one
contiguous range of every buffer: the piece the paged optimizer copies to the GPU with one ``memcpy`` per
buffer.

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
    """Tiles ``[tile0, tile1)``, covering global blocks ``[block0, block1)``."""

    tile0: int
    tile1: int
    block0: int
    block1: int


@dataclass
class FlatLayout:
    """Where each parameter's state lives in the flat buffers, and the tiles that cover them."""

    params: list[torch.Tensor]
    first_block: list[int]  # first global block of each parameter
    nblocks: int
    tiles: torch.Tensor  # int32 [ntiles, 2]: (parameter index, first block inside the parameter), on the device
    chunks: list[Chunk]

    @property
    def max_chunk_blocks(self) -> int:
        """Blocks in the largest chunk (what a staging buffer must hold)."""
        return max(c.block1 - c.block0 for c in self.chunks)


def blocks_of(numel: int) -> int:
    """Number of 256-element blocks covering ``numel`` elements."""
    return -(-numel // BLOCK)


def build_layout(params: Sequence[torch.Tensor], device: torch.device, chunk_blocks: int | None = None) -> FlatLayout:
    """Lay ``params`` out back to back in 256-blocks; tile them; cut the tiles into chunks of
    ~``chunk_blocks``."""
    nb = torch.tensor([blocks_of(p.numel()) for p in params], dtype=torch.int64)
    first = torch.cumsum(nb, 0) - nb
    ntiles = -(-nb // TILE_BLOCKS)
    owner = torch.repeat_interleave(torch.arange(len(params)), ntiles)  # [T] parameter of each tile
    tile_start = torch.cumsum(ntiles, 0) - ntiles
    local = (torch.arange(int(ntiles.sum())) - tile_start[owner]) * TILE_BLOCKS  # first block inside the param
    gstart = first[owner] + local  # first global block of each tile
    gend = first[owner] + torch.minimum(local + TILE_BLOCKS, nb[owner])
    total = int(nb.sum())
    if chunk_blocks is None or chunk_blocks >= total:
        chunks = [Chunk(0, len(owner), 0, total)]
    else:
        # A tile belongs to the chunk its first block falls in, so a chunk spans at most chunk_blocks + R -
        # 1 blocks.
        _, counts = torch.unique_consecutive(gstart // chunk_blocks, return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0] + ends[:-1]
        chunks = [Chunk(a, b, int(gstart[a]), int(gend[b - 1])) for a, b in zip(starts, ends, strict=True)]
    tiles = torch.stack([owner, local], 1).to(torch.int32).to(device)
    return FlatLayout(list(params), first.tolist(), total, tiles, chunks)


class FlatStates:
    """Zero-initialised flat buffers ``{name: tensor}`` for a layout; per-block buffers hold one value a
    block."""

    def __init__(
        self,
        layout: FlatLayout,
        specs: dict[str, tuple[torch.dtype, bool]],
        device: torch.device,
        pinned: bool = False,
    ):
        """``specs[name] = (dtype, per_element)``; ``pinned`` puts the buffers in page-locked host memory."""
        self.layout = layout
        self.per_element = {name: per_el for name, (_, per_el) in specs.items()}
        where = dict(device="cpu", pin_memory=True) if pinned else dict(device=device)
        self.buffers = {
            name: torch.zeros(layout.nblocks * (BLOCK if per_el else 1), dtype=dtype, **where)
            for name, (dtype, per_el) in specs.items()
        }

    def view(self, name: str, i: int) -> torch.Tensor:
        """Parameter ``i``'s part of buffer ``name``: shaped like the parameter, or [blocks] for per-block
        ones."""
        p = self.layout.params[i]
        b0 = self.layout.first_block[i]
        if self.per_element[name]:
            return self.buffers[name][b0 * BLOCK : b0 * BLOCK + p.numel()].view(p.shape)
        return self.buffers[name][b0 : b0 + blocks_of(p.numel())]

    def adopt(self, states: Sequence[dict]) -> None:
        """Copy any tensors already in ``states[i]`` into the buffers, then make ``states[i][name]`` the
        views."""
        for i, state in enumerate(states):
            for name in self.buffers:
                view = self.view(name, i)
                old = state.get(name)
                if old is not None:
                    if old.numel() != view.numel():
                        raise ValueError(
                            f"optimizer state {name!r} of a parameter of shape"
                            f" {tuple(self.layout.params[i].shape)}"
                            f" has {old.numel()} elements, expected {view.numel()}: the state dict does not"
                            " belong to these parameters"
                        )
                    view.copy_(old.reshape(view.shape))
                state[name] = view


def param_table(
    layout: FlatLayout, grads: Sequence[torch.Tensor | None], rows: Sequence[int], device: torch.device
) -> torch.Tensor:
    """int64 [n, 5] (param address, grad address or 0 = skip, numel, first block, scalar row) on
    ``device``."""
    data = [
        [p.data_ptr(), 0 if g is None else g.data_ptr(), p.numel(), b, r]
        for p, g, b, r in zip(layout.params, grads, layout.first_block, rows, strict=True)
    ]
    return to_device(torch.tensor(data, dtype=torch.int64), device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host table to ``device`` without blocking (through pinned memory when it is a GPU)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)  # the host allocator keeps it until the copy is done


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
