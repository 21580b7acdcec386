"""Shared fixtures: the ``device`` fixture runs a test on the CPU and on CUDA when one is present."""

import os

# bitsandbytes' CPU reference path wraps itself in torch.compile; compiling costs minutes on a 2-core CI machine
# and changes no value, so tests run it eagerly. Set before torch is imported.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
