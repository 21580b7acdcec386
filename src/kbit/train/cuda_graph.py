"""A whole training step (forward, backward, optimizer step) captured once in a CUDA graph and replayed.

At small batches a QLoRA step is bound by the host, not the GPU: one Llama-3-8B step at 1 x 2048 tokens launches
thousands of kernels (Triton launches, autograd, the LoRA nodes) and on an H100 took ~245 ms of host time for
~133 ms of GPU work. Replaying a captured graph launches them all at once, so the step costs its GPU time.

What a graph needs, and what this module checks or arranges:
- the same shapes every step (one graph per batch shape: pad or pack batches to one length);
- no host synchronisation inside the step (kbit's fused loss skips its compaction of ignored targets while a
  capture is running; offloaded activations synchronise on their copies, so memory plans that offload are refused);
- tensors that outlive a step in fixed places: the batch is copied into static inputs, the gradients are
  allocated by the captured backward and rewritten by each replay, and the optimizer must be capturable (its step
  counters on the device: ``torch.optim.AdamW(..., capturable=True)``);
- warm-up steps before the capture, on a side stream, so lazy initialisation (cuBLAS handles, Triton compilation,
  the optimizer's state, the caching allocator's pools) happens outside the graph. These are real steps.

Capturing records the step without running it, so :meth:`GraphedStep.step` on the capturing batch replays right
after the capture: every call trains on its batch exactly once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> loss, running backward and optimizer.step()


def check_graphable(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise a one-line ValueError when ``model``'s memory plan or ``optimizer`` cannot run inside a CUDA graph."""
    from ..models.checkpointing import decoder_layers
    from ..models.offload import Offloader

    for layer in decoder_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and isinstance(getattr(func, "__self__", None), Offloader):
            raise ValueError(
                "cuda graph: offloaded activations wait on their copies on the host; use memory plan speed, "
                "full or none (or turn cuda graphs off)"
            )
    for group in optimizer.param_groups:
        if "capturable" in group and not group["capturable"]:
            raise ValueError(
                f"cuda graph: {type(optimizer).__name__} must be built with capturable=True (step counts on the GPU)"
            )
    if not any(p.is_cuda for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("cuda graph: the parameters are not on a CUDA device")


class GraphedStep:
    """``step_fn`` (a whole training step on a batch dict) run through one CUDA graph per batch shape."""

    def __init__(self, step_fn: StepFn, warmup: int = 2):
        self.step_fn = step_fn
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None

    def _shape(self, batch: dict[str, torch.Tensor]) -> dict:
        return {k: (tuple(v.shape), v.dtype, v.device) for k, v in batch.items()}

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Train on ``batch``; returns the step's loss (a tensor the next call overwrites: copy it to keep it)."""
        if self.warmup > 0:  # eager steps on a side stream: lazy initialisation stays out of the graph
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.step_fn(batch).detach()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.static = {k: v.clone() for k, v in batch.items()}
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.step_fn(self.static).detach()
        elif self._shape(batch) != self._shape(self.static):
            raise ValueError(
                f"cuda graph: captured for batch {self._shape(self.static)}, got {self._shape(batch)}; pad or pack "
                "every batch to one shape"
            )
        for k, v in batch.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return self.loss
