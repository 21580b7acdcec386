"""GEMV diagnostics at one row (H100): how the shared-memory-table GEMV's time scales with N, against a copy of
the same bytes and an empty launch in the same graph-timed harness, with and without programmatic dependent launch.

python3 bench/gemv_diag.py [RT,REP,WARPS,PER_SM ...]  (default: gemv4_smem.config_for)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dequant import time_graph  # noqa: E402
from generate import copy_bandwidth, gemv_rotation  # noqa: E402

from kbit.kernels.triton import gemv4, gemv4_smem  # noqa: E402


def main() -> None:
    bw = copy_bandwidth()
    print(json.dumps(dict(copy_tb_s=round(bw / 1e12, 3))), flush=True)
    one = [torch.zeros(1, device="cuda") for _ in range(4)]
    print(json.dumps(dict(empty_us=round(time_graph(lambda t: t.add_(1), one), 2))), flush=True)
    configs = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [None]
    for n, k in ((4096, 4096), (14336, 4096), (57344, 4096), (4096, 14336)):
        qs, x, nbytes = gemv_rotation(n, k)
        srcs = [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),
                 torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")) for _ in qs]  # fmt: skip
        row = dict(shape=f"{n}x{k}", mb=round(nbytes / 1e6, 2))
        cus = time_graph(lambda p: p[1].copy_(p[0]), srcs)
        row["copy_same_bytes_us"] = round(cus, 2)
        row["copy_same_bytes_frac"] = round(nbytes / cus / 1e-6 / bw, 3)
        row["lut_us"] = round(time_graph(lambda item, x=x: gemv4.gemv_4bit(x, *item, config=gemv4.CONFIG), qs), 2)
        for cfg in configs:
            for pdl in (False, True):
                us = time_graph(lambda item, c=cfg, p=pdl, x=x: gemv4_smem.gemv_4bit(x, *item, config=c, pdl=p), qs)
                row[f"smem{cfg}{'pdl' if pdl else ''}"] = [round(us, 2), round(nbytes / us / 1e-6 / bw, 3)]
        print(json.dumps(row), flush=True)
        del qs, srcs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
