"""Test-wide setup. Runs before any test module imports triton kernels.

Without a CUDA GPU, Triton kernels can only run under the interpreter, and the
variable must be set before their ``@triton.jit`` decorators execute.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The portability check (scripts/portable_check.py) runs the training tests with oneDNN switched off;
# unset, as in CI, nothing changes.
if os.environ.get("CTSSL_TEST_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def intra_op_threads() -> int:
    """Threads of the tests that pin torch to one (tiny tensors on shared cores); the portability check
    sets CTSSL_TEST_THREADS=2 to see whether their results depend on it."""
    return int(os.environ.get("CTSSL_TEST_THREADS", "1"))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
