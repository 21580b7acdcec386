"""The fused AdamW update on CUDA: flat state buckets (one per parameter dtype), their kernel tables, one
launch per chunk.

What a step costs on the host: the per-step scalar rows (one per param group and step count, usually one), a
tuple of parameter and gradient addresses per bucket (uploaded only when one changed, e.g. when ``zero_grad``
freed the gradients and the allocator put them elsewhere), and one kernel launch per chunk. Everything that
depends only on the parameter set (buckets, layouts, tile tables, which rows the parameters use) is built in
:meth:`FusedUpdate.activate`, when that set changes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch

from .flat import Chunk, ParamTable, adopt, scalar_row, synchronize, upload_into
from .plan import ParamSet

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rebuild_buckets(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], new_bucket: Callable, old: dict
) -> dict:
    """Flat state buckets (one per parameter dtype) for ``params``, holding the state they already have."""
    synchronize(old)  # paged: the host copies of the old buffers must be complete before they are read
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(optimizer).__name__} updates {FLOAT_DTYPES} parameters, got {p.dtype}")
        by_dtype[p.dtype].append(p)
    buckets = {dt: new_bucket(ps, ps[0].device) for dt, ps in by_dtype.items()}
    for bucket in buckets.values():
        adopt(bucket, [optimizer.state[p] for p in bucket.layout.params])
    return buckets


def _launch(kernel: Callable, tiles, ptable, stable, tables, dtype, states: tuple, chunk: Chunk) -> None:
    if len(states) == 2:  # plain moments: no absmax buffers
        states = (*states, None, None)
    kernel(
        tiles,
        ptable,
        stable,
        states,
        tables,
        dtype,
        tile0=chunk.tile0,
        ntiles=chunk.tile1 - chunk.tile0,
        blk_base=chunk.block0,
    )


class FusedUpdate:
    """Buckets, kernel tables and scalar rows of an optimizer's fused update; rebuilt on activation only."""

    def __init__(self, new_bucket: Callable, tables: tuple[torch.Tensor, ...] | None, torch_order: bool):
        """``new_bucket(params, device)`` makes a bucket; ``tables`` (maps, bin tables) selects 8-bit states in
        bitsandbytes' order, None plain moments in torch's order."""
        from ..kernels.triton.adamw8bit import adamw_tiles  # Triton is imported only on the fused path

        self.kernel = adamw_tiles
        self.new_bucket = new_bucket
        self.tables = tables
        self.torch_order = torch_order
        self.buckets: dict = {}
        self.ptables: dict[torch.dtype, ParamTable] = {}
        self.index: dict[torch.dtype, list[int]] = {}  # ParamSet index of each bucket parameter (n: skip it)
        self.rows: dict[torch.dtype, tuple[int, ...]] = {}
        self.row_batches: list = []  # the batch behind each scalar row
        self.scalars: torch.Tensor | None = None

    def activate(self, optimizer: torch.optim.Optimizer, ps: ParamSet, fused: list[int]) -> None:
        """Hold the parameters ``fused`` (ParamSet indices, all active) in buckets and assign their rows."""
        held = {id(p) for b in self.buckets.values() for p in b.layout.params}
        if any(id(ps.params[i]) not in held for i in fused):
            needed = held | {id(ps.params[i]) for i in fused}
            params = [p for p in ps.params if id(p) in needed]
            self.buckets = rebuild_buckets(optimizer, params, self.new_bucket, self.buckets)
            self.ptables = {dt: ParamTable(b.layout, b.device) for dt, b in self.buckets.items()}
        chosen = set(fused)
        row_of: dict[int, int] = {}
        self.row_batches = []
        for batch in ps.batches:
            mine = [i for i in batch.indices if i in chosen]
            if mine:
                row_of.update(dict.fromkeys(mine, len(self.row_batches)))
                self.row_batches.append(batch)
        position = {id(p): i for i, p in enumerate(ps.params) if i in chosen}
        n = len(ps.params)
        for dt, bucket in self.buckets.items():  # a held parameter not chosen this time maps to n: skipped
            self.index[dt] = [position.get(id(p), n) for p in bucket.layout.params]
            self.rows[dt] = tuple(row_of.get(j, 0) for j in self.index[dt])

    def step(self, ps: ParamSet) -> None:
        """Enqueue one update of every bucket parameter with a gradient (the steps already counted)."""
        if not self.row_batches:
            return
        rows = []
        for b in self.row_batches:  # read every step: a scheduler may have changed the learning rate
            g = b.group
            rows.append(scalar_row(g["betas"], g["eps"], g["lr"], g["weight_decay"], b.step, self.torch_order))
        host = torch.tensor(rows, dtype=torch.float32)
        device = next(iter(self.buckets.values())).device
        if self.scalars is None or self.scalars.shape != host.shape:
            self.scalars = torch.empty(host.shape, dtype=torch.float32, device=device)
        upload_into(self.scalars, host)
        grads = [*ps.grads, None]  # index n: a bucket parameter not updated this time
        for dt, bucket in self.buckets.items():
            table = self.ptables[dt]
            params = bucket.layout.params
            pptrs = tuple(p.data_ptr() for p in params)
            if table.key is not None and pptrs != table.key[0]:
                moved = [p for p in params if p.device != bucket.device]
                if moved:
                    raise RuntimeError(
                        f"a parameter (shape {tuple(moved[0].shape)}) moved to {moved[0].device} after its"
                        f" optimizer state was made on {bucket.device}; create the optimizer after moving the model"
                    )
            gptrs = tuple(0 if g is None else g.data_ptr() for g in map(grads.__getitem__, self.index[dt]))
            table.update(pptrs, gptrs, self.rows[dt])
            bucket.run(partial(_launch, self.kernel, bucket.layout.tiles, table.table, self.scalars, self.tables, dt))

    def synchronize(self) -> None:
        """Wait until every bucket's host copies are complete."""
        synchronize(self.buckets)
