"""Paged optimizer state: pinned host memory streamed through a few GPU staging sets, one chunk at a time.

Host layout: the state of each region (:mod:`kbit.optim.flat`: a chunk of whole parameters, or one large
parameter) is one contiguous range of a single pinned buffer, one section per state buffer (``state1``,
``state2``, ``absmax1``, ``absmax2``, or ``exp_avg``, ``exp_avg_sq``), each 512-byte aligned. A chunk of whole
parameters therefore moves with one copy each way; a chunk of a large parameter with one copy per section. A
staging set is one GPU byte buffer laid out like the largest chunk; every view the pipeline needs (copy sources
and targets, the kernel's state arguments) is made once here, not per step.

Pipeline (CUDA): chunk i goes through staging set i % S. Its upload runs on an upload stream after the
download of chunk i - S (which used the same set) is done; the update kernel runs on the current stream after
the upload; its download runs on a download stream after the update. With S = 3 sets the upload of chunk i+1
and the download of chunk i-1 run while chunk i is updated; with S = 2 they share a set, so they alternate.
The current stream never waits for a download: the next forward pass does not wait for the state to reach
the host, only the next step's uploads do.

On CPU (tests through Triton's interpreter) the same copies and launches run in order, unpinned."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flat import BLOCK, Chunk, build_layout

ALIGN = 512  # bytes: every section starts here aligned (DMA-friendly, and any dtype's view is aligned)


def _pad(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class PagedStates:
    """Flat optimizer states in (pinned) host memory, run through ``sets`` GPU staging buffers chunk by chunk."""

    def __init__(
        self,
        params: list[torch.Tensor],
        device: torch.device,
        specs: dict[str, tuple[torch.dtype, bool]],
        chunk_blocks: int,
        sets: int,
    ):
        """Zero-initialised host state for ``params``; chunks of at most ``chunk_blocks`` 256-blocks.

        ``specs[name] = (dtype, per_element)``, in the kernel's order of state arguments.
        """
        if sets < 2:
            raise ValueError(f"staging_sets must be at least 2 (one uploading while one is updated), got {sets}")
        self.device = device
        self.layout = build_layout(params, device, chunk_blocks)
        self.per_element = {name: per_el for name, (_, per_el) in specs.items()}
        self.dtypes = {name: dtype for name, (dtype, _) in specs.items()}
        # bytes per 256-block of each state buffer
        self.bpb = {name: (BLOCK if per_el else 1) * dtype.itemsize for name, (dtype, per_el) in specs.items()}
        cuda = device.type == "cuda"
        self.host = torch.zeros(self._lay_out_host(), dtype=torch.uint8, pin_memory=cuda)
        self.region_of = self._region_of_params()
        local, pieces = self._plan_chunks()
        cap = max(sum(_pad(self._span(n, c)) for n in specs) for c in self.layout.chunks)
        self.staging = [torch.empty(cap, dtype=torch.uint8, device=device) for _ in range(sets)]
        # Every view a step needs, per staging set and chunk: copy (target, source) pairs, the kernel's states.
        host = self.host
        self.up = [[[(st[s : s + n], host[h : h + n]) for s, h, n in ps] for ps in pieces] for st in self.staging]
        self.down = [[[(h, s) for s, h in chunk] for chunk in per_set] for per_set in self.up]
        self.states = [
            [
                tuple(st[secs[n] : secs[n] + self._span(n, c)].view(self.dtypes[n]) for n in specs)
                for c, secs in zip(self.layout.chunks, local, strict=True)
            ]
            for st in self.staging
        ]
        self.streams = self._make_streams(sets) if cuda else None

    def _lay_out_host(self) -> int:
        """Section offsets of each region in the host buffer (region after region, a section per name); its
        size."""
        self.sections: list[dict[str, int]] = []
        offset = 0
        for b0, b1 in self.layout.regions:
            secs = {}
            for name in self.bpb:
                secs[name] = offset
                offset += _pad((b1 - b0) * self.bpb[name])
            self.sections.append(secs)
        return offset

    def _plan_chunks(self) -> tuple[list[dict[str, int]], list[list[tuple[int, int, int]]]]:
        """Per chunk: its section offsets inside a staging set, and its (staging offset, host offset, bytes)
        copies: one for a whole region (laid out alike on both sides), one per section for a piece of one."""
        local, pieces = [], []
        for c in self.layout.chunks:
            b0, b1 = self.layout.regions[c.region]
            secs, at = {}, 0
            for name in self.bpb:
                secs[name] = at
                at += _pad(self._span(name, c))
            local.append(secs)
            host = self.sections[c.region]
            if (c.block0, c.block1) == (b0, b1):
                pieces.append([(0, host[next(iter(host))], at)])
            else:
                pieces.append([(secs[n], host[n] + (c.block0 - b0) * self.bpb[n], self._span(n, c)) for n in secs])
        return local, pieces

    def _make_streams(self, sets: int) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        self.upload, self.download = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        # The staging memory was allocated for the current stream, which may still be using it for what it held
        # before: the side streams start after that work (later uses are ordered by the events).
        current = torch.cuda.current_stream(self.device)
        self.upload.wait_stream(current)
        self.download.wait_stream(current)
        for buf in self.staging:  # freed buffers must wait for the side streams' last copies before reuse
            buf.record_stream(self.upload)
            buf.record_stream(self.download)
        self.loaded = [torch.cuda.Event() for _ in range(sets)]
        self.updated = [torch.cuda.Event() for _ in range(sets)]
        self.free = [torch.cuda.Event() for _ in range(sets)]
        return self.upload, self.download

    def _span(self, name: str, chunk: Chunk) -> int:
        return (chunk.block1 - chunk.block0) * self.bpb[name]

    def _region_of_params(self) -> list[int]:
        starts = [b0 for b0, _ in self.layout.regions]
        out, r = [], 0
        for b in self.layout.first_block:
            while r + 1 < len(starts) and starts[r + 1] <= b:
                r += 1
            out.append(r)
        return out

    @property
    def staging_bytes(self) -> int:
        """GPU bytes held by the staging sets."""
        return sum(s.numel() for s in self.staging)

    def view(self, name: str, i: int) -> torch.Tensor:
        """Parameter ``i``'s state ``name`` in host memory: shaped like the parameter, or [blocks] per block."""
        p = self.layout.params[i]
        r = self.region_of[i]
        start = self.sections[r][name] + (self.layout.first_block[i] - self.layout.regions[r][0]) * self.bpb[name]
        n = p.numel() if self.per_element[name] else -(-p.numel() // BLOCK)
        t = self.host[start : start + n * self.dtypes[name].itemsize].view(self.dtypes[name])
        return t.view(p.shape) if self.per_element[name] else t

    def run(self, launch: Callable[[tuple[torch.Tensor, ...], Chunk], None]) -> None:
        """Upload each chunk, ``launch(states, chunk)`` on the current stream, download it; returns at once."""
        chunks, sets = self.layout.chunks, len(self.staging)
        if self.streams is None:
            for i, chunk in enumerate(chunks):
                for dst, src in self.up[0][i]:
                    dst.copy_(src)
                launch(self.states[0][i], chunk)
                for dst, src in self.down[0][i]:
                    dst.copy_(src)
            return
        main = torch.cuda.current_stream(self.device)
        up, down = self.streams
        try:
            for i, chunk in enumerate(chunks):
                k = i % sets
                torch.cuda.set_stream(up)
                up.wait_event(self.free[k])  # chunk i - sets has left set k
                for dst, src in self.up[k][i]:
                    dst.copy_(src, non_blocking=True)
                self.loaded[k].record(up)
                torch.cuda.set_stream(main)
                main.wait_event(self.loaded[k])
                launch(self.states[k][i], chunk)
                self.updated[k].record(main)
                torch.cuda.set_stream(down)
                down.wait_event(self.updated[k])
                for dst, src in self.down[k][i]:
                    dst.copy_(src, non_blocking=True)
                self.free[k].record(down)
        finally:
            torch.cuda.set_stream(main)

    def synchronize(self) -> None:
        """Wait until the host buffers hold the last step's state."""
        if self.streams is not None:
            self.upload.synchronize()
            self.download.synchronize()
