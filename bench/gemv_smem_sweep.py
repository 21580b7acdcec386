"""Sweep of the shared-memory-table GEMV (gemv4_smem) against the PRMT one (gemv4 LUT) at one row, H100.

python3 bench/gemv_smem_sweep.py  (tilings (RT, REP, warps, programs per SM), PDL on)
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dequant import time_graph  # noqa: E402
from generate import copy_bandwidth, gemv_rotation  # noqa: E402

from kbit.kernels.triton import gemv4, gemv4_smem  # noqa: E402
from kbit.quant import dequantize_4bit  # noqa: E402


def main() -> None:
    bw = copy_bandwidth()
    print(json.dumps(dict(copy_tb_s=round(bw / 1e12, 3))), flush=True)
    configs = [c for c in itertools.product((2, 4, 8), (1, 2), (4, 8), (1, 2)) if c[0] * c[1] <= 16]
    totals = dict.fromkeys(configs, 0.0)
    per_shape = {}
    lut_total = 0.0
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        qs, x, nbytes = gemv_rotation(n, k)
        packed, state = qs[0]
        ref = x.float() @ dequantize_4bit(packed, state).float().t()
        lut = gemv4.gemv_4bit(x, packed, state, config=gemv4.CONFIG).float()
        err = lambda y, ref=ref: ((y.float() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
        us = time_graph(lambda item, x=x: gemv4.gemv_4bit(x, *item, config=gemv4.CONFIG), qs)
        lut_total += us
        frac = round(nbytes / us / 1e-6 / bw, 3)
        print(json.dumps(dict(shape=f"{n}x{k}", kernel="lut", us=round(us, 2), bw_frac=frac, err=err(lut))), flush=True)
        for cfg in configs:
            try:
                y = gemv4_smem.gemv_4bit(x, packed.reshape(-1), state, config=cfg)
                e = err(y)
                us = time_graph(lambda item, cfg=cfg, x=x: gemv4_smem.gemv_4bit(x, *item, config=cfg), qs)
            except Exception as ex:  # noqa: BLE001
                print(json.dumps(dict(config=cfg, error=f"{type(ex).__name__}: {str(ex)[:200]}")), flush=True)
                totals[cfg] = float("inf")
                continue
            totals[cfg] += us
            per_shape.setdefault(f"{n}x{k}", []).append((round(us, 2), round(nbytes / us / 1e-6 / bw, 3), cfg))
            if e > 1e-2:
                print(json.dumps(dict(config=cfg, shape=f"{n}x{k}", bad_err=e)), flush=True)
                totals[cfg] = float("inf")
        print(json.dumps(dict(shape=f"{n}x{k}", best=sorted(per_shape[f"{n}x{k}"])[:5])), flush=True)
        del qs
        torch.cuda.empty_cache()
    ranked = sorted((v, c) for c, v in totals.items())
    print(json.dumps(dict(lut_sum_us=round(lut_total, 1), best=[(round(v, 1), c) for v, c in ranked[:8]])), flush=True)
    # per-shape numbers of the best config
    cfg = ranked[0][1]
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        qs, x, nbytes = gemv_rotation(n, k)
        us = time_graph(lambda item, x=x: gemv4_smem.gemv_4bit(x, *item, config=cfg), qs)
        print(json.dumps(dict(shape=f"{n}x{k}", kernel="smem", config=cfg, us=round(us, 2),
                              bw_frac=round(nbytes / us / 1e-6 / bw, 3))), flush=True)  # fmt: skip
        del qs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
