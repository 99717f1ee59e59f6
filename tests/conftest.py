"""Test-wide setup. Runs before any test module imports triton kernels.

Without a CUDA GPU, Triton kernels can only run under the interpreter, and the
variable must be set before their ``@triton.jit`` decorators execute.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
