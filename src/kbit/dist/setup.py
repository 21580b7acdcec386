"""The process group of a ``torchrun`` launch and this rank's place in it: one ``DistContext`` passed down.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every worker's
environment; :func:`init_distributed` reads them once at start-up, opens the default process group (NCCL on
CUDA, gloo on CPU) and picks this rank's device (``cuda:<LOCAL_RANK>``), so that each rank places its own
model on its own device. A plain ``python``/``kbit`` launch gets a single-process context whose collectives are
no-ops, so the trainer has one code path for both.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's rank, the world size, its device, and the collectives the trainer needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes the files only one process may write."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) ``values`` over the ranks, as float64 on this rank's device; identity in one process."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            # float64: token counts and loss sums must add up exactly enough to equal a one-process run's
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (picklable objects; identity in one process)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher with its environment variables) started this process."""
    return all(name in os.environ for name in LAUNCH_VARS)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Open the default process group from torchrun's environment and pick this rank's device.

    Without torchrun's variables it returns a single-process context on ``device`` and opens nothing; under
    torchrun it opens the group even for one process (FSDP on one GPU, e.g. with CPU offload, needs it).
    ``device``: ``auto`` (this rank's GPU when CUDA is present, else CPU), ``cpu`` or ``cuda`` (``cuda:N`` only
    in one process: under torchrun each rank owns ``cuda:LOCAL_RANK``).
    """
    if not launched_by_torchrun():
        if device == "auto":
            return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return DistContext(device=torch.device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda:"):
        raise ValueError(
            f"device: {device!r} names one GPU, but under torchrun each rank uses cuda:LOCAL_RANK; "
            "use device=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device: cuda asked for, but torch sees no CUDA GPU; use device=cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "give torchrun --nproc-per-node at most the number of GPUs"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def current_context(device: torch.device | None = None) -> DistContext:
    """The context of an already opened default process group (single-process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=device or torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if device is None:
        device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def close_distributed() -> None:
    """Destroy the default process group if one is open (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
