"""The progress bar (tqdm): step, loss, learning rate, tokens/s and memory; log lines printed above it."""

from __future__ import annotations

import sys

import torch


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        import resource

        # ru_maxrss is in KiB on Linux (bytes on macOS): the peak, which is what the GPU number reports too.
        scale = 2**30 if sys.platform == "darwin" else 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class Progress:
    """A bar over optimizer steps; it draws itself only on a terminal, while log lines always print."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None):
        from tqdm.auto import tqdm

        # disable=None: tqdm draws on a TTY and stays silent in CI logs, where the log lines suffice.
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=None if enabled is None else not enabled,
            file=sys.stderr,
        )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, memory: float) -> None:
        self.bar.set_postfix_str(
            f"loss={loss:.4f} lr={lr:.2e} tok/s={tokens_per_s:,.0f} mem={memory:.2f}GiB", refresh=False
        )
        self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        """Print a line above the bar (to stdout)."""
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
