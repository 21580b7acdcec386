"""Paged optimizers: state in pinned host memory, streamed through the GPU chunk by chunk on side streams.

Why not bitsandbytes' way: its paged optimizers allocate state with ``cudaMallocManaged`` and leave eviction
to the driver, which can ask for more managed memory than the GPU has free (and hang it). kbit pages
explicitly and never uses managed memory. The flat state buffers (:mod:`kbit.optim.flat`) are page-locked host
memory; a step walks their chunks (consecutive tiles, 1/32 of the state each by default): chunk i is uploaded
into GPU staging set i % 2 on an upload stream, updated by the fused kernel on the current stream, and
downloaded on a download stream. With two staging sets the upload of chunk i+1 and the download of chunk i-1
run while chunk i is updated; events make a set's next upload wait for its download. The GPU holds two chunks
of state (under 10% of it) plus the float32 states of small tensors.

Cost: the state crosses the host link twice a step, so a step takes at least state bytes / link bandwidth
(about 2 ms per 85 MB each way at 45 GB/s), however fast the update kernel is.

On CPU (and without Triton) the paged classes are the plain ones: ``PagedAdamW8bit`` steps exactly as
:class:`~kbit.optim.AdamW8bit`, ``PagedAdamW`` as ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..kernels.dispatch import use_triton
from .adamw8bit import AdamW8bit, check_hyperparameters, fused_step, params_with_grad, rebuild_buckets
from .flat import BLOCK, Chunk, FlatStates, blocks_of, build_layout, standalone_state_dict, synchronize

CHUNKS = 32  # two staging sets hold 2/32 = 6.25% of the state
MIN_CHUNK_BLOCKS = 1024  # 256 Ki elements: smaller copies would be dominated by their fixed cost


class PagedStates:
    """Flat states in pinned host memory, run through two GPU staging sets chunk by chunk."""

    def __init__(
        self,
        params: list[torch.Tensor],
        device: torch.device,
        specs: dict[str, tuple[torch.dtype, bool]],
        chunk_blocks: int | None = None,
    ):
        """Zero-initialised pinned buffers for ``params``, moved in chunks of ``chunk_blocks`` 256-blocks."""
        if chunk_blocks is None:
            total = sum(blocks_of(p.numel()) for p in params)
            chunk_blocks = max(MIN_CHUNK_BLOCKS, -(-total // CHUNKS))
        self.device = device
        self.flat = FlatStates(build_layout(params, device, chunk_blocks), specs, device, pinned=True)
        cap = self.flat.layout.max_chunk_blocks
        self.staging = [
            {
                name: torch.empty(cap * (BLOCK if self.flat.per_element[name] else 1), dtype=buf.dtype, device=device)
                for name, buf in self.flat.buffers.items()
            }
            for _ in range(2)
        ]
        self.upload = torch.cuda.Stream(device)
        self.download = torch.cuda.Stream(device)
        for bufs in self.staging:  # freed buffers must wait for the side streams' last copies before reuse
            for buf in bufs.values():
                buf.record_stream(self.upload)
                buf.record_stream(self.download)
        self.loaded = [torch.cuda.Event() for _ in range(2)]
        self.updated = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]

    def _span(self, name: str, chunk: Chunk) -> tuple[int, int]:
        k = BLOCK if self.flat.per_element[name] else 1
        return chunk.block0 * k, chunk.block1 * k

    def run(self, launch: Callable[[dict[str, torch.Tensor], Chunk], None]) -> None:
        """Upload each chunk, ``launch(staging, chunk)`` on the current stream, download it; returns at
        once."""
        main = torch.cuda.current_stream(self.device)
        for i, chunk in enumerate(self.flat.layout.chunks):
            k = i % 2
            bufs = self.staging[k]
            self.upload.wait_event(self.free[k])  # set k's previous chunk is back on the host
            with torch.cuda.stream(self.upload):
                for name, host in self.flat.buffers.items():
                    lo, hi = self._span(name, chunk)
                    bufs[name][: hi - lo].copy_(host[lo:hi], non_blocking=True)
                self.loaded[k].record(self.upload)
            main.wait_event(self.loaded[k])
            launch(bufs, chunk)
            self.updated[k].record(main)
            self.download.wait_event(self.updated[k])
            with torch.cuda.stream(self.download):
                for name, host in self.flat.buffers.items():
                    lo, hi = self._span(name, chunk)
                    host[lo:hi].copy_(bufs[name][: hi - lo], non_blocking=True)
                self.free[k].record(self.download)

    def synchronize(self) -> None:
        """Wait until the host buffers hold the last step's state."""
        self.upload.synchronize()
        self.download.synchronize()


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its 8-bit states in pinned host memory on CUDA (small fp32 ones on the GPU)."""

    def __init__(self, *args, chunk_blocks: int | None = None, **kwargs):
        """As AdamW8bit; ``chunk_blocks``: 256-element blocks per transfer (default 1/32 of the state)."""
        super().__init__(*args, **kwargs)
        self.chunk_blocks = chunk_blocks

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> PagedStates:
        from .adamw8bit import STATE8_SPECS

        return PagedStates(params, device, STATE8_SPECS, self.chunk_blocks)


class PagedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with its moments (in the parameter dtype) in pinned host memory on CUDA.

    The update is torch's single-tensor AdamW in one fused launch a chunk (float32 math, one rounding to the
    moment dtype per step); on CPU this is ``torch.optim.AdamW`` itself. State dicts are torch's AdamW format.
    """

    NAMES = ("exp_avg", "exp_avg_sq", None, None)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        chunk_blocks: int | None = None,
    ):
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.chunk_blocks = chunk_blocks
        self._buckets: dict[torch.dtype, PagedStates] = {}

    def _new_bucket(self, params: list[torch.Tensor], device: torch.device) -> PagedStates:
        specs = {"exp_avg": (params[0].dtype, True), "exp_avg_sq": (params[0].dtype, True)}
        return PagedStates(params, device, specs, self.chunk_blocks)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """torch's AdamW step; on CUDA with the moments paged in from host memory."""
        active = params_with_grad(self)
        if not active or not use_triton(active[0][1]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            active = params_with_grad(self)
        held = {id(p) for b in self._buckets.values() for p in b.flat.layout.params}
        for _, p in active:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)  # torch's format: a float32 CPU scalar
            state["step"] += 1
        if not all(id(p) in held for _, p in active):
            needed = held | {id(p) for _, p in active}
            params = [p for g in self.param_groups for p in g["params"] if id(p) in needed]
            self._buckets = rebuild_buckets(self, params, self._new_bucket)
        steps = {id(p): int(self.state[p]["step"].item()) for _, p in active}
        fused_step(self._buckets, active, steps, None, self.NAMES)
        return loss

    def state_dict(self) -> dict:
        """torch's AdamW state dict, every state tensor a standalone copy."""
        return standalone_state_dict(self, self._buckets)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's AdamW loader; the flat buffers are rebuilt from the loaded state at the next step."""
        synchronize(self._buckets)
        self._buckets = {}
        super().load_state_dict(state_dict)
