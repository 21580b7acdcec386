"""The shared-memory GEMV's table (kbit.kernels.triton.gemv4_smem), built with torch on any device."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


def _gluon():
    try:
        from kbit.kernels.triton import gemv4_smem
    except ImportError:  # a Triton without Gluon
        pytest.skip("this Triton has no Gluon")
    return gemv4_smem


def test_smem_table_holds_both_codes_of_every_byte_in_every_copy():
    """The shared-memory table: entry (byte b, copy c) = (code[b >> 4], code[b & 15]) as float32, in 16 copies."""
    smem = _gluon()
    code = torch.linspace(-1, 1, 16) ** 3
    b = torch.arange(256)
    t = smem.smem_table(code).view(torch.float32).reshape(256, 16, 2)
    for c in (0, 7, 15):
        assert torch.equal(t[:, c, 0], code[b >> 4]) and torch.equal(t[:, c, 1], code[b & 15])
    assert smem.smem_table(code) is smem.smem_table(code)  # cached on the code tensor


def test_the_dispatcher_and_the_kernel_agree_on_the_row_limit():
    from kbit.kernels import dispatch

    assert dispatch.GEMV_MAX_ROWS == _gluon().MAX_ROWS
