"""Per-batch tables in the operators' formats: ``ctssl.patch_tables`` (csrc/tables.cpp, tables_cuda.cu)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparse.index import PatchIndex
from .runtime import fake, ops


@dataclass(frozen=True)
class PatchTables:
    """The index in the operators' formats: slot (B,h,w) int32, patch_ids (N,) int64, neighbours (N,3,3) int32."""

    slot: torch.Tensor
    patch_ids: torch.Tensor
    neighbours: torch.Tensor


def patch_tables(index: PatchIndex) -> PatchTables:
    """Build the tables with ``ctssl.patch_tables`` once per batch (cached on the index)."""
    cache = index.backend_cache("cuda")
    if "tables" not in cache:
        slot, ids, nbr = ops().patch_tables(index.active.contiguous(), index.num_patches)
        cache["tables"] = PatchTables(slot, ids, nbr)
    return cache["tables"]


@fake("patch_tables")
def _patch_tables_fake(active, num_patches):
    slot = active.new_empty(active.shape, dtype=torch.int32)
    patch_ids = active.new_empty((num_patches,), dtype=torch.int64)
    neighbours = active.new_empty((num_patches, 3, 3), dtype=torch.int32)
    return slot, patch_ids, neighbours


__all__ = ["PatchTables", "patch_tables"]
