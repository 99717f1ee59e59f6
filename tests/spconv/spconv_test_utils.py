"""Shared test helpers: packed maps at any stride built from a dense map, masks with edge cases."""
from __future__ import annotations

import torch

from ctssl.sparse import PatchIndex, random_patch_mask
from ctssl.sparse.tensor import MaskedDenseTensor, PackedTensor


def masks(batch: int, grid: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SparK masks plus the edge cases every backend must survive."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    random = random_patch_mask(batch, grid, 0.6, generator=g)
    one_empty = random.clone()
    one_empty[0] = False
    one_empty[-1, 0, 0] = True
    corner = torch.zeros(batch, h, w, dtype=torch.bool)
    corner[:, -1, -1] = True
    corner[0, 0, 0] = True
    return {
        "random": random,
        "all_visible": torch.ones(batch, h, w, dtype=torch.bool),
        "one_image_empty": one_empty,
        "corners": corner,
        "none_visible": torch.zeros(batch, h, w, dtype=torch.bool),
    }


def pair_at_stride(x: torch.Tensor, active: torch.Tensor, stride: int, dense_backend, sparse_backend):
    """The same masked map ``x`` (B, C, H, W) at ``stride`` as a dense-reference and a packed tensor."""
    index = PatchIndex(active)
    p = index.patch_side(stride)
    B, C, H, W = x.shape
    assert (H, W) == (index.h * p, index.w * p)
    xd = MaskedDenseTensor(x * index.dense_mask(stride, x.dtype), index, stride, dense_backend)
    patches = x.permute(0, 2, 3, 1).reshape(B, index.h, p, index.w, p, C).permute(0, 1, 3, 2, 4, 5)
    rows = patches.reshape(-1, p, p, C).index_select(0, index.patch_ids).reshape(-1, C).contiguous()
    return xd, PackedTensor(rows, index, stride, sparse_backend)
