"""What the memory plan moves to host memory: recomputed layers' saved inputs, and the input embedding table.

Full checkpointing keeps one tensor per decoder layer on the GPU between forward and backward: the layer's
input, from which the backward recomputes the layer (layers x tokens x hidden x 2 bytes; 4 GiB for the
Llama-3-8B shape at 8 x 2048, 105 GB at 400k tokens). Offload moves each to host memory while the forward goes
on and brings it back one layer ahead in the backward, so the copies overlap with compute:

- forward: ``torch.utils.checkpoint`` (non-reentrant) saves its inputs as saved tensors outside its own hooks,
  so a ``saved_tensors_hooks`` pair around the call sees exactly those (the layer's inner saves go to
  checkpoint's hooks, which store nothing). The pack hook copies the layer input into pinned host memory on a
  side stream, after the compute stream's work so far. The GPU tensor stays referenced until the layer's forward
  is queued; then the compute stream waits for the copy (long done by then) and lets it go, so the allocator
  reuses its memory only after the copy has read it.
- backward: unpacking layer i's input (the start of its recomputation) starts the copy back of the input packed
  before it, layer i-1's, on the side stream; the compute stream waits on that copy's event only when layer i-1
  needs it. The first input needed (the last layer's) is copied back when asked for.

Host memory: each input gets a :class:`HostBuffer` of exactly its bytes (to the page), page-locked with
``cudaHostRegister``. torch's own pinned allocator (``pin_memory``) rounds every block up to a power of two: a 3.05
GiB layer input (8B shape, 400k tokens) takes a 4 GiB block, and 27 of them no longer fit a 128 GiB host.
Registering costs about as much as writing the memory once, so each :class:`Offloader` keeps its buffers in a
:class:`HostPool` and reuses them from step to step; a buffer goes back to the pool when its saved input is freed
(after the layer's backward), with an event that later copies into it wait for.

A CUDA graph can capture all of it (:mod:`kbit.train.cuda_graph`): stream waits become the graph's edges, no
``record_stream`` defers a free to the end of the capture, and the buffers a graph copies into are held by the pool
for as long as it lives.

On a CPU the same code runs with unregistered host buffers and no streams, so the CPU tests exercise the packing,
the pool, the prefetch chain and the gradients.

:class:`HostEmbedding` keeps a frozen input embedding table in host memory, from which the GPU reads only the
looked-up rows.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PAGE_BYTES = mmap.PAGESIZE
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every device's context, not only the current one
_pinned = {"current": 0, "peak": 0}  # bytes registered by HostBuffers in this process (torch's pool not included)


def registered_bytes(nbytes: int) -> int:
    """Host bytes a :class:`HostBuffer` of ``nbytes`` page-locks: ``nbytes`` rounded up to whole pages."""
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def pinned_host_bytes() -> tuple[int, int]:
    """(bytes page-locked by kbit's host buffers now, the most since :func:`reset_pinned_host_peak`)."""
    return _pinned["current"], _pinned["peak"]


def reset_pinned_host_peak() -> None:
    """Start counting the peak of :func:`pinned_host_bytes` from what is page-locked now."""
    _pinned["peak"] = _pinned["current"]


class HostBuffer:
    """``nbytes`` of host memory (``data``, uint8) for one offloaded tensor; with ``pin``, page-locked for CUDA
    over exactly its own pages (``cudaHostRegister``) until the buffer is freed, so copies to and from it run
    asynchronously. ``ready``: an event after the last copy queued on it (None: no copy pending)."""

    __slots__ = ("data", "nbytes", "pinned", "ready", "_map", "_ptr")

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes, self.pinned = nbytes, pin
        self.ready: torch.cuda.Event | None = None
        self._ptr: int | None = None
        if not pin:
            self.data = torch.empty(nbytes, dtype=torch.uint8)
            return
        # An anonymous mapping of its own: page-aligned whole pages that no other buffer shares (two buffers on one
        # page could not both register it), and a tensor whose storage starts where the registration does.
        size = registered_bytes(nbytes)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        pages = torch.frombuffer(self._map, dtype=torch.uint8)
        pages.fill_(0)  # faults the pages in on every core; registering then only locks them
        err = torch.cuda.cudart().cudaHostRegister(pages.data_ptr(), size, _REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(
                f"offload: page-locking {size / 2**30:.2f} GiB of host memory for a layer input failed "
                f"({torch.cuda.CudaError(int(err))}); free host memory, or offload fewer layers (memory_plan full)"
            )
        self._ptr = pages.data_ptr()
        self.data = pages[:nbytes]
        _pinned["current"] += size
        _pinned["peak"] = max(_pinned["peak"], _pinned["current"])

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is None:  # not pinned, or registration failed
            return
        if self.ready is not None:
            self.ready.synchronize()  # a copy still reading or writing it: unlock only after it
        torch.cuda.cudart().cudaHostUnregister(self._ptr)
        _pinned["current"] -= registered_bytes(self.nbytes)


class HostPool:
    """Free :class:`HostBuffer` s kept for reuse: a request takes the smallest free buffer that holds it. When none
    does, the inputs have grown (a longer batch): the free buffers of that kind could serve none of them, so they
    are released before a new one is made. Held memory is thus at most the most inputs ever alive at once, each of
    the largest size seen since the sizes last grew."""

    def __init__(self) -> None:
        self._free: list[HostBuffer] = []
        self._held: list[HostBuffer] = []  # buffers a captured CUDA graph writes to: never released

    def take(self, nbytes: int, pin: bool) -> HostBuffer:
        """A buffer of at least ``nbytes`` (exactly ``nbytes`` when a new one is made)."""
        fits = [b for b in self._free if b.pinned == pin and b.nbytes >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.nbytes)
            self._free.remove(best)
            return best
        self._free = [b for b in self._free if b.pinned != pin]  # too small for this step's inputs: release
        return HostBuffer(nbytes, pin)

    def hold(self, buffer: HostBuffer) -> None:
        """Keep ``buffer`` allocated for as long as this pool lives (a captured CUDA graph copies into it)."""
        if all(b is not buffer for b in self._held):
            self._held.append(buffer)

    def give_back(self, buffer: HostBuffer) -> None:
        """Keep ``buffer`` for a later :meth:`take` (its ``ready`` event marks its last queued copy)."""
        self._free.append(buffer)

    def clear(self) -> None:
        """Release every free buffer (buffers in use come back, and are kept, when their inputs are freed)."""
        self._free.clear()

    @property
    def free_bytes(self) -> int:
        """Bytes of the free buffers."""
        return sum(b.nbytes for b in self._free)


class SavedInput:
    """One layer input held in host memory, copied back to its device ahead of time or when unpacked.

    Graph-safe on CUDA (a CUDA graph may capture the packing and unpacking): the GPU input is kept referenced until
    the compute stream has been made to wait for its copy out (:meth:`release`), rather than handed to
    ``record_stream``, whose deferred frees would hold every offloaded input until the end of a capture; no event
    recorded outside a capture is waited on inside one."""

    __slots__ = ("host", "buffer", "pool", "device", "stream", "previous", "fetched", "source", "copied",
                 "__weakref__")  # fmt: skip

    def __init__(
        self, tensor: torch.Tensor, stream: torch.cuda.Stream | None, previous: weakref.ref | None, pool: HostPool
    ):
        self.device, self.stream, self.previous, self.pool = tensor.device, stream, previous, pool
        self.fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.source: torch.Tensor | None = None  # the GPU input, until the compute stream waits for its copy
        self.copied: torch.cuda.Event | None = None
        nbytes = tensor.numel() * tensor.element_size()
        self.buffer = pool.take(nbytes, pin=stream is not None) if nbytes else None
        if self.buffer is None:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype)
        else:
            self.host = self.buffer.data[:nbytes].view(tensor.dtype).view(tensor.shape)
        with torch.no_grad():  # pack hooks run under grad mode; the copy is not part of the graph
            if stream is None:
                self.host.copy_(tensor)
                return
            capturing = torch.cuda.is_current_stream_capturing()
            if capturing and self.buffer is not None:
                pool.hold(self.buffer)  # the graph writes to it at every replay: never released
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the input has been written by then
            if self.buffer is not None and self.buffer.ready is not None and not capturing:
                stream.wait_event(self.buffer.ready)  # the buffer's copies for an earlier step are done by then
            with torch.cuda.stream(stream):
                self.host.copy_(tensor, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record()
            self.source = tensor

    def release(self) -> None:
        """Let the GPU input go: the compute stream waits for its copy out first, so its memory is reused only after
        the copy has read it (a no-op once done, and on a CPU)."""
        if self.source is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.source = None

    def fetch(self) -> None:
        """Start the copy back to the device (once; a no-op while one is pending)."""
        if self.fetched is not None:
            return
        if self.stream is None:
            self.fetched = (self.host.clone(), None)
            return
        self.release()
        out = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # for the compute stream
        # The block may still be read by queued compute-stream kernels that freed it: the copy waits for them.
        # The compute stream uses ``out`` only after waiting for ``done`` (unpack), so no record_stream is needed.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out.copy_(self.host, non_blocking=True)  # after this input's own copy out: same stream
            done = torch.cuda.Event()
            done.record()
        self.fetched = (out, done)

    def unpack(self) -> torch.Tensor:
        """The input on its device, ready for the compute stream; starts fetching the one needed next."""
        self.fetch()
        out, done = self.fetched
        self.fetched = None  # a second backward (retain_graph) copies again
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.fetch()  # overlaps with this layer's recomputation and backward
        return out

    def __del__(self) -> None:
        if getattr(self, "fetched", None) is not None and self.fetched[1] is not None:
            # fetched but never unpacked: its copy back may still be writing ``out``
            torch.cuda.current_stream(self.device).wait_event(self.fetched[1])
        if getattr(self, "source", None) is not None:
            self.release()
        buffer = getattr(self, "buffer", None)
        if buffer is None:
            return
        if self.stream is not None:  # every copy of this buffer was queued on self.stream: after them
            if torch.cuda.is_current_stream_capturing():
                buffer.ready = None  # a graph's copies are ordered by its replays; its events cannot be waited on
            else:
                buffer.ready = torch.cuda.Event()
                buffer.ready.record(self.stream)
        self.pool.give_back(buffer)


def _unpack(saved: Any) -> Any:
    return saved.unpack() if isinstance(saved, SavedInput) else saved


class Offloader:
    """The checkpoint function of offloaded layers: one per model, holding its side streams, its pool of host
    buffers and the chain of inputs packed in the current forward (each links to the one before it, weakly: a
    freed graph frees them)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None
        self.pool = HostPool()

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def saved(self) -> list[SavedInput]:
        """The inputs this offloader holds now (the chain of the current forward), in forward order."""
        chain, link = [], self._last
        while link is not None and link() is not None:
            chain.append(link())
            link = chain[-1].previous
        return chain[::-1]

    def checkpoint(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """Non-reentrant ``torch.utils.checkpoint`` of ``function(*args)``, its first argument kept in host memory."""
        # A list emptied after the call, not a closure over the tensor: the pack hook lives as long as the saved
        # tensor does and would otherwise keep the GPU input alive.
        target = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        made: list[weakref.ref] = []

        def pack(t: torch.Tensor) -> Any:
            if not target or t is not target[0]:
                return t  # other saved inputs (none from transformers' layers, whose kwargs are bound) stay put
            saved = SavedInput(t, self._stream(t.device), self._last, self.pool)
            self._last = weakref.ref(saved)
            made.append(self._last)
            return saved

        kwargs.setdefault("use_reentrant", False)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                return checkpoint(function, *args, **kwargs)
        finally:
            target.clear()
            for ref in made:  # the layer's forward is queued: its input's copy out has had that long to finish
                if ref() is not None:
                    ref().release()


class HostEmbedding(nn.Module):
    """An input embedding whose table stays in host memory, so the [vocab, H] table (1 GiB for Llama-3-8B) takes no
    GPU memory; only the looked-up rows, [B, T, H], go to the device.

    For a CUDA model with a plain ``nn.Embedding`` the table is page-locked (a :class:`HostBuffer`) and the GPU reads
    the rows straight from it (:func:`kbit.kernels.dispatch.gather_rows`): no synchronisation, so a CUDA graph can
    capture the lookup. Other families' lookups (Gemma scales the rows) run on the CPU and send the rows over.

    The table is a buffer named ``weight``: the state dict keeps its key, ``parameters()`` (and so the optimizer and
    anything that finds a model's device from its first parameter) no longer see it. Frozen tables only.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        embedding.to("cpu")  # in place: its table and buffers (Gemma's scale), where the lookup runs
        table = embedding.weight.detach()
        self.host: HostBuffer | None = None
        if device.type == "cuda" and type(embedding) is nn.Embedding and table.is_contiguous():
            self.host = HostBuffer(table.numel() * table.element_size(), pin=True)
            pinned = self.host.data.view(table.dtype).view(table.shape)
            pinned.copy_(table)
            embedding.weight.data = pinned
            table = pinned
        self.register_buffer("weight", table)  # the same storage as the inner table, under the same key
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.device = device  # where the looked-up rows go: the decoder layers'
        self.inner = [embedding]  # in a list, not a submodule: its parameter stays out of parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inner = self.inner[0]
        if self.host is not None and ids.is_cuda and inner.weight.data_ptr() == self.host.data.data_ptr():
            from ..kernels.dispatch import gather_rows

            if not torch.cuda.is_current_stream_capturing():  # the check synchronises: not inside a graph
                bad = (ids < 0) | (ids >= self.num_embeddings)  # (a captured graph replays without this check)
                if bad.any():
                    raise IndexError(
                        f"embedding: token id {int(ids[bad][0])} is outside the vocabulary of {self.num_embeddings}"
                    )
            return gather_rows(inner.weight, ids)
        rows = inner(ids.to(inner.weight.device))  # the family's own lookup (Gemma scales the rows)
        if rows.device.type == "cpu" and self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)


def offload_input_embeddings(model: nn.Module) -> str:
    """Move ``model``'s frozen, untied input embedding table to host memory (:class:`HostEmbedding`); returns a line."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    emb = hf.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return "input embeddings: in CPU memory"
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return f"input embeddings: kept on the GPU ({type(emb).__name__} is not an nn.Embedding)"
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return "input embeddings: kept on the GPU (tied to the LM head, which the GPU needs)"
    if emb.weight.requires_grad:
        return "input embeddings: kept on the GPU (they are trained)"
    host = HostEmbedding(emb, emb.weight.device)
    hf.set_input_embeddings(host)
    return f"input embeddings: {host.weight.nbytes / 2**30:.2f} GiB table moved to CPU memory"
