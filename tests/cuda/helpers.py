"""Shared tools of the cuda-backend tests: skips that name what is missing, a CPU twin of the backend."""
from __future__ import annotations

import pytest
import torch

from ctssl import _ext
from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.backends.cuda import CudaBackend

from ..sparse.helpers import edge_masks, rel_err  # noqa: F401  (shared with the sparse tests)

EXT_REASON = _ext.missing_reason()
needs_ext = pytest.mark.skipif(EXT_REASON is not None, reason=f"needs ctssl's compiled extension: {EXT_REASON}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CpuTwin(CudaBackend):
    """The cuda backend's Python glue running the operators' CPU loops (CudaBackend refuses CPU tensors)."""

    name = "cuda"

    def unavailable_reason(self):
        return _ext.missing_reason()

    def check_device(self, device):
        pass


def masks(batch: int, h: int, w: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random masks plus the edge cases: an image with none visible, one with all, a single patch."""
    return edge_masks(batch, h, w, gen)


def sparse_at(images: torch.Tensor, active: torch.Tensor, backend, stride: int = 1):
    """A sparse map at ``stride`` (identity average pooling brings stride 1 down)."""
    be = get_backend(backend) if isinstance(backend, str) else backend
    x = be.sparse_input(images, PatchIndex(active))
    if stride > 1:
        x = be.avg_pool2d(x, stride, stride, 0)
    return x
