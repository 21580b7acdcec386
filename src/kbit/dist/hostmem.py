"""Host memory of this process, to report what each rank's model loading cost (Linux /proc, else ru_maxrss).

``ru_maxrss`` is a lifetime high-water mark that Linux carries over from the parent across exec (a torchrun
worker would inherit its launcher's), so the peak is read from ``/proc/self/status`` (VmHWM) after resetting it
with ``/proc/self/clear_refs``, which makes the peak cover the measured span alone.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak (VmHWM) to the current resident size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_gib() -> float:
    """Resident host memory now, GiB (the peak so far where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def peak_rss_gib() -> float:
    """Peak resident host memory since the last :func:`reset_peak_rss` (or since start), GiB."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20
