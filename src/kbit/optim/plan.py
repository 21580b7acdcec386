"""The parameter set of an optimizer, read once and reused while it holds, so a step does little host work.

Why: a step over the hundreds of LoRA tensors of a large model is bound by host work, not by the GPU: one
fused 8-bit update of 42M parameters is well under a millisecond of memory traffic, while walking the param
groups, validating every gradient and grouping parameters by hyperparameters and step costs microseconds per
tensor. That work depends only on which parameters exist and which of them have gradients, which rarely
changes, so :class:`ParamSet` does it when that changes (a param group added or edited, a gradient appearing
or vanishing) and a step then reads each ``.grad``, compares it with the last step's by identity and counts
the step.

Grouping: parameters that share a param group and a step count share every per-step scalar (a *batch*).
While the set of parameters with gradients is unchanged, each of them advances one step per step, so the
batches stay the same and only their step counts move."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import is_not

import torch


@dataclass
class Batch:
    """Active parameters (indices into :attr:`ParamSet.params`) of one param group at one step count."""

    group: dict
    step: int
    indices: list[int]


def groups_key(groups: list[dict]) -> tuple:
    """Identity of the param groups and of every parameter in them, in order."""
    return tuple((id(g), tuple(map(id, g["params"]))) for g in groups)


class ParamSet:
    """Every parameter of an optimizer's groups, which of them had a gradient at the last step, and their batches.

    It holds references to the parameters and groups, so the ids in :attr:`key` cannot be reused while it lives.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        """Read ``optimizer.param_groups``."""
        groups = optimizer.param_groups
        self.name = type(optimizer).__name__
        self.key = groups_key(groups)
        self.params: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        self.groups: list[dict] = [g for g in groups for _ in g["params"]]
        self.where = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]
        self.contiguous = False  # gradients must be contiguous and of the parameter's dtype (the fused kernel)
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.active: list[int] = []  # indices of the parameters with a gradient at the last refresh
        self.batches: list[Batch] = []
        self.states: list[dict] = []  # optimizer.state of each active parameter, in self.active order

    def _describe(self, i: int) -> str:
        gi, pi = self.where[i]
        return f"parameter {pi} of param group {gi} (shape {tuple(self.params[i].shape)})"

    def refresh(self) -> bool:
        """Read every gradient (raising on sparse or, when required, non-contiguous ones); True when the set of
        parameters with a gradient differs from the last refresh."""
        grads = [p.grad for p in self.params]
        old = self.grads
        if not any(map(is_not, grads, old)):  # the same gradient tensors as last step (checked then)
            return False
        changed = False
        fused, params = self.contiguous, self.params
        for i, (g, h) in enumerate(zip(grads, old, strict=True)):
            if g is h:
                continue
            if g is None or h is None:
                changed = True
                if g is None:
                    continue
            if g.is_sparse:
                where = self._describe(i)
                raise RuntimeError(f"{self.name} does not support sparse gradients ({where}); use dense ones")
            if fused and (not g.is_contiguous() or g.dtype != params[i].dtype):  # inline: runs per tensor
                self._check_fusable(i, g)
        self.grads = grads  # only once checked: a refused gradient is checked again at the next refresh
        return changed

    def _check_fusable(self, i: int, g: torch.Tensor) -> None:
        """Raise unless parameter ``i`` and its gradient ``g`` suit the fused kernel."""
        p = self.params[i]
        if not (p.is_contiguous() and g.is_contiguous()) or g.dtype != p.dtype:
            raise RuntimeError(
                f"the fused AdamW needs contiguous parameters with gradients of their dtype ({self._describe(i)}:"
                f" {p.dtype}, gradient {g.dtype}, contiguous {p.is_contiguous()} and {g.is_contiguous()})"
            )

    def check_devices(self) -> None:
        """Raise unless every parameter with a gradient is on one device."""
        devices: dict[torch.device, int] = {}
        for i, g in enumerate(self.grads):
            if g is not None:
                devices.setdefault(self.params[i].device, i)
        if len(devices) > 1:
            found = ", ".join(f"{d} ({self._describe(i)})" for d, i in devices.items())
            raise RuntimeError(f"{self.name} needs all parameters on one device, found {found}; move the model first")

    def first_with_grad(self) -> torch.Tensor | None:
        """The first parameter that has a gradient (as of the last refresh), or None."""
        return next((p for p, g in zip(self.params, self.grads, strict=True) if g is not None), None)

    def activate(
        self,
        state: dict,
        init_state: Callable[[torch.Tensor], None],
        step_of: Callable[[dict], int],
        contiguous: bool,
    ) -> None:
        """After a change of the active set: check devices (and, if ``contiguous``, layouts), initialise new
        state, regroup into batches.

        Call before counting the step; batches then hold the step each parameter is about to take.
        """
        self.contiguous = contiguous
        self.active = [i for i, g in enumerate(self.grads) if g is not None]
        self.check_devices()
        for i in self.active:
            p = self.params[i]
            if contiguous:
                self._check_fusable(i, self.grads[i])
            if not state[p]:
                init_state(p)
        self.states = [state[self.params[i]] for i in self.active]
        by_key: dict[tuple[int, int], Batch] = {}
        for i, s in zip(self.active, self.states, strict=True):
            group, step = self.groups[i], step_of(s) + 1
            batch = by_key.get((id(group), step))
            if batch is None:
                batch = by_key[(id(group), step)] = Batch(group, step, [])
            batch.indices.append(i)
        self.batches = list(by_key.values())

    def advance(self) -> None:
        """Move every batch one step on (the active set did not change since they were formed)."""
        for b in self.batches:
            b.step += 1

    def ready(self, activate: Callable[[ParamSet], None]) -> bool:
        """Start a step: read the gradients, then ``activate(self)`` if the set of parameters with a gradient changed
        (if that raises, :attr:`key` is cleared so the optimizer rebuilds the set at its next step: it may be
        half-built), else move the batches on; True when some parameter has a gradient."""
        if self.refresh():
            try:
                activate(self)
            except BaseException:
                self.key = None
                raise
        else:
            self.advance()
        return bool(self.active)
