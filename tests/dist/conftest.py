"""Tests of kbit.dist: 2 gloo processes on the CPU (one torchrun launch per module) against one-process runs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread; the reference runs here use one, like each rank of the launch."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
