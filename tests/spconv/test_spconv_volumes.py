"""spconv backend on volumes (SubMConv3d, SparseConv3d, SparseMaxPool3d) against the dense reference: forward
only, on CPU (spconv's CPU build has no backward), one thread (the backend pins it), float64."""
from __future__ import annotations

import pytest
import torch

from ctssl.sparse import get_backend
from ctssl.sparse.backends.spconv import SpconvBackend

from ..sparse.helpers import sparse_at

pytestmark = pytest.mark.skipif(SpconvBackend("spconv").unavailable_reason() is not None,
                                reason="spconv not installed")

PATCH = 8
GRID = (2, 3, 2)  # unequal sides: confusing two axes reads beyond the grid


def _masks():
    g = torch.Generator().manual_seed(0)
    random = torch.rand(2, *GRID, generator=g) < 0.5
    random[0] = False  # a volume that shows nothing
    random[1, 0, 0, 0] = random[1, 1, 2, 1] = True
    return {"random": random, "none_visible": torch.zeros(2, *GRID, dtype=torch.bool)}


MASKS = _masks()
# (name, feature stride, kernel, stride, padding): the 3-D ResNet's layers
CONVS = [
    ("stem_7x7x7_s2", 1, 7, 2, 3),
    ("3x3x3_s1", 2, 3, 1, 1),
    ("3x3x3_s1_p1", 8, 3, 1, 1),  # 1-voxel patches: every tap but the centre reads a neighbour
    ("3x3x3_s2", 2, 3, 2, 1),
    ("1x1x1_s2", 2, 1, 2, 0),
]


def _pair(active, stride, channels, seed=0, shift=0.0):
    images = torch.randn(2, channels, *(g * PATCH for g in GRID), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64) + shift
    return (sparse_at(images, active, "dense", stride, PATCH), sparse_at(images, active, "spconv", stride, PATCH))


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name,fstride,k,s,pad", CONVS, ids=[c[0] for c in CONVS])
def test_conv3d_matches_dense(mask, name, fstride, k, s, pad):
    active = MASKS[mask]
    xd, xs = _pair(active, fstride, 3)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, k, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    for bias in (None, b):
        yd = get_backend("dense").conv3d(xd, w, bias, s, pad, 1, 1)
        ys = get_backend("spconv").conv3d(xs, w, bias, s, pad, 1, 1)
        assert ys.stride == yd.stride == fstride * s
        assert ys.values.shape == (int(active.sum()) * ys.patch_side ** 3, 4)
        torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask", list(MASKS))
def test_max_pool3d_matches_dense(mask):
    """Negative inputs: spconv's pool alone returns max(0, max over active voxels), SparK's does not."""
    xd, xs = _pair(MASKS[mask], 2, 3, shift=-1.0)
    yd, ys = get_backend("dense").max_pool3d(xd, 3, 2, 1), get_backend("spconv").max_pool3d(xs, 3, 2, 1)
    assert ys.stride == 4
    torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-12, atol=1e-12)


def test_volume_indices_are_contiguous_int32_with_depth():
    _, xs = _pair(MASKS["random"], 2, 3)
    get_backend("spconv").conv3d(xs, torch.randn(4, 3, 3, 3, 3, dtype=torch.float64), None, 1, 1, 1, 1)
    indices = xs.index.backend_cache("spconv")[("pixels", 2)][0]
    assert indices.dtype == torch.int32 and indices.is_contiguous() and indices.shape[1] == 4
    assert indices[:, 1].max() < GRID[0] * PATCH // 2 and indices[:, 2].max() >= GRID[0] * PATCH // 2
