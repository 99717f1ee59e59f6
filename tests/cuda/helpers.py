"""Shared tools of the cuda-backend tests: skips that name what is missing, a CPU twin of the backend."""
from __future__ import annotations

import pytest
import torch

from ctssl.cuda_ops import runtime
from ctssl.sparse.backends.cuda import CudaBackend

from ..sparse.helpers import edge_masks, rel_err, sparse_at  # noqa: F401  (shared with the sparse tests)

EXT_REASON = runtime.missing_reason()
needs_ext = pytest.mark.skipif(EXT_REASON is not None, reason=f"needs ctssl's compiled extension: {EXT_REASON}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CpuTwin(CudaBackend):
    """The cuda backend's Python glue running the operators' CPU loops (CudaBackend refuses CPU tensors)."""

    name = "cuda"

    def unavailable_reason(self):
        return runtime.missing_reason()

    def check_device(self, device):
        pass
