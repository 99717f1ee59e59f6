"""Per-batch tables in the operators' formats: ``ctssl.patch_tables`` and ``ctssl.neighbour_table``
(csrc/tables.cpp, tables_cuda.cu)."""
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


def neighbour_table(index: PatchIndex, radius: int) -> torch.Tensor:
    """The int32 neighbour table of ``radius`` ``(N, 2r+1, 2r+1)``, what a window reaching ``radius`` patches away
    reads (a 7x7 depthwise conv: 3 at 1-pixel patches); built with ``ctssl.neighbour_table`` once per batch and
    radius (cached on the index). Radius 0 and 1 share ``patch_tables``' 3x3 table."""
    if radius <= 1:
        return patch_tables(index).neighbours
    cache = index.backend_cache("cuda")
    key = ("neighbours", radius)
    if key not in cache:
        t = patch_tables(index)
        cache[key] = ops().neighbour_table(t.slot, t.patch_ids, radius)
    return cache[key]


@fake("neighbour_table")
def _neighbour_table_fake(slot, patch_ids, radius):
    side = 2 * radius + 1
    return slot.new_empty((patch_ids.shape[0], side, side))


@fake("patch_tables")
def _patch_tables_fake(active, num_patches):
    slot = active.new_empty(active.shape, dtype=torch.int32)
    patch_ids = active.new_empty((num_patches,), dtype=torch.int64)
    neighbours = active.new_empty((num_patches, 3, 3), dtype=torch.int32)
    return slot, patch_ids, neighbours


__all__ = ["PatchTables", "neighbour_table", "patch_tables"]
