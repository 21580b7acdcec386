"""Launches each batch-1 GEMV a few times, for Nsight Compute (H100):

ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    -k regex:gemv4 python3 bench/gemv_ncu.py
"""

from __future__ import annotations

import torch

from kbit.kernels.triton import gemv4
from kbit.quant import quantize_4bit


def main() -> None:
    for n, k in ((4096, 4096), (14336, 4096)):
        packed, state = quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4", 64, True)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            gemv4.gemv_4bit(x, packed, state)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
