"""A training step's forward and backward captured once in a CUDA graph and replayed; the optimizer runs as usual.

At small batches a QLoRA step is bound by the host, not the GPU: one Llama-3-8B step at 1 x 2048 tokens launches
thousands of kernels (Triton launches, autograd, the LoRA nodes) and on an H100 took ~245 ms of host time for
~133 ms of GPU work (more with the memory plan "memory", which replays every layer). Replaying a captured graph
launches them all at once, so the forward and backward cost their GPU time.

What a graph needs, and what this module checks or arranges:
- the same shapes every step (one graph per batch shape: pad or pack batches to one length);
- no host synchronisation inside the forward and backward: kbit's fused loss skips its compaction of ignored
  targets while a capture is running, the offloaded layer inputs (:mod:`kbit.models.offload`) are copied out and
  back with stream waits only, and an input embedding kept in host memory is read by the GPU in place;
- no attention mask built from the batch: transformers checks on the host whether a row packs several sequences,
  and while capturing builds an explicit mask instead; ``GraphedStep(packed=False)`` (batches of one sequence per
  row) skips the check during the capture so the causal attention kernels run;
- no random numbers (dropout off: a replay would draw the captured ones again, :func:`check_graphable` refuses it);
- tensors that outlive a step in fixed places: the batch is copied into static inputs, and every trainable
  parameter's ``.grad`` is a tensor allocated before the capture, into which the captured backward adds in place
  (as ``loss.backward()`` does). So gradient accumulation over several replays works as it does eagerly; zero them
  with ``optimizer.zero_grad(set_to_none=False)`` between optimizer steps (a gradient set to None is zeroed and put
  back before the next replay, at the cost of one launch per parameter);
- warm-up steps before the capture, on a side stream, so lazy initialisation (cuBLAS handles, Triton compilation,
  the caching allocator's pools, host buffers) happens outside the graph. These are real forward and backward passes.

The optimizer step stays outside the graph, so any optimizer works (paged and 8-bit states included) and the
learning-rate schedule and gradient clipping stay ordinary Python. Capturing records the step without running it,
so :meth:`GraphedStep.step` on the capturing batch replays right after the capture: every call adds the gradients
of its batch exactly once. Several GraphedSteps (one per batch shape) can share one memory pool (``pool``): their
replays run one after the other and keep nothing in it between replays but their loss.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> loss, after running its backward


def check_graphable(model: nn.Module) -> None:
    """Raise a one-line ValueError when ``model``'s forward and backward cannot run inside a CUDA graph."""
    from ..models.offload import HostEmbedding

    if model.training:
        for name, module in model.named_modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                raise ValueError(
                    f"cuda graph: {name} drops out with p={module.p} (a replay would reuse the captured draws); "
                    "set dropout (lora_dropout) to 0 or turn cuda graphs off"
                )
    for module in model.modules():
        if isinstance(module, HostEmbedding) and module.host is None:
            raise ValueError(
                f"cuda graph: the input embedding ({type(module.inner[0]).__name__}) is looked up on the CPU; keep it "
                "on the GPU or turn cuda graphs off"
            )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or not all(p.is_cuda for p in trainable):
        raise ValueError("cuda graph: the trainable parameters are not on a CUDA device")


@contextlib.contextmanager
def _rows_unpacked(on: bool):
    """Within the block, transformers takes every batch row for one whole sequence with no padding mask. It decides
    whether SDPA may run causal without a mask by reading the position ids (sequences packed into a row) and the
    padding mask on the host; while capturing it cannot and builds an explicit mask instead (the causal kernels
    traded for masked ones, the grouped key/value heads repeated in memory). Only for batches known to hold one
    unpadded sequence per row (``GraphedStep(packed=False)``, no attention mask passed)."""
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    ignore = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if not on or find is None or ignore is None:
        yield
        return
    signature = inspect.signature(ignore)

    def ignore_causal_mask(*args, **kwargs):
        a = signature.bind(*args, **kwargs)
        a.apply_defaults()
        v = a.arguments
        q_len, kv_len = v.get("query_length", v.get("q_length")), v.get("kv_length")
        local = v.get("local_attention_size")
        if v.get("padding_mask") is None and (local is None or kv_len < local) and q_len in (1, kv_len):
            return True  # what transformers decides outside a capture when nothing is padded
        return ignore(*args, **kwargs)

    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find
        masking_utils._ignore_causal_mask_sdpa = ignore


class GraphedStep:
    """``step_fn`` (forward and backward of a batch dict) run through one CUDA graph per batch shape."""

    def __init__(self, step_fn: StepFn, params: list[torch.Tensor], warmup: int = 2, packed: bool = True, pool=None):
        self.step_fn = step_fn
        # Batches may pack several sequences into one row (position ids restart within it): the safe default. False
        # (one sequence per row) lets the captured attention skip the mask (_rows_unpacked).
        self.packed = packed
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        # One side stream for the warm-ups and the capture: cuBLAS keeps a workspace per stream it ran on (32 MiB on
        # Hopper), so a new stream per warm-up would leave one behind each time.
        self.stream: torch.cuda.Stream | None = None
        self.pool = pool  # torch.cuda.graph_pool_handle() shared with other GraphedSteps, or None: its own
        self.grads: list[torch.Tensor] = []  # the parameters' gradients the graph adds into

    def _shape(self, batch: dict[str, torch.Tensor]) -> dict:
        return {k: (tuple(v.shape), v.dtype, v.device) for k, v in batch.items()}

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the gradients of ``batch`` to the parameters' ``.grad``, as ``loss.backward()`` would; returns its loss
        (a tensor the next call overwrites: copy it to keep it)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        if self.warmup > 0:  # eager steps on the side stream: lazy initialisation stays out of the graph
            self.warmup -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = self.step_fn(batch).detach()
            torch.cuda.current_stream().wait_stream(self.stream)
            return loss
        if self.graph is None:
            for p in self.params:  # fixed places outside the graph's memory, which the captured backward adds into
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grads = [p.grad for p in self.params]
            self.static = {k: v.clone() for k, v in batch.items()}
            self.graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # streams' workspaces from before: made again on use
                torch._C._cuda_clearCublasWorkspaces()
            with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream), _rows_unpacked(not self.packed):
                self.loss = self.step_fn(self.static).detach()
        elif self._shape(batch) != self._shape(self.static):
            raise ValueError(
                f"cuda graph: captured for batch {self._shape(self.static)}, got {self._shape(batch)}; pad or pack "
                "every batch to one shape"
            )
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is not g:  # set to None (or replaced) since: zero, and put the graph's tensor back
                g.zero_()
                p.grad = g
        for k, v in batch.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return self.loss
