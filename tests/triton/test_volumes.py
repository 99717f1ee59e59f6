"""The Triton kernels on volumes (NDIM 3): conv (27-tap GEMMs, the 7x7x7 stem, strides 1 and 2, 1x1x1), max
pool, BatchNorm with its fusions, pack / to_dense / densify, against the dense float64 reference.

Patches of side 8 keep the volumes small (the interpreter's cost is per program instance).
"""
import pytest
import torch
from torch import nn

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import BatchNorm3d, Conv3d, InstanceNorm3d, MaxPool3d, ReLU

from ..sparse.helpers import random_batchnorm
from .util import F64, compare_module, needs_triton, rel_err, sparse_at

pytestmark = needs_triton

PATCH = 8
GRID = (2, 3, 2)  # unequal sides: a kernel that confuses two axes reads beyond the grid
SIZE = tuple(g * PATCH for g in GRID)


def volume_masks(gen, batch=2):
    """A random mask whose first volume shows nothing (the second at least one patch), and an empty batch."""
    random = torch.rand(batch, *GRID, generator=gen) < 0.5
    random[0] = False
    random[1, 0, 0, 0] = True
    return [random, torch.zeros(batch, *GRID, dtype=torch.bool)]


def compare(make, cin, stride, gen, **kw):
    compare_module(make, cin, stride, gen, size=SIZE, batch=2, masks=volume_masks(gen), patch_size=PATCH, **kw)


@pytest.mark.parametrize("k,s,pad,stride,cin,cout", [
    (7, 2, 3, 1, 1, 5),    # the stem on one-channel CT (FLAT_K: 343 taps x 1 channel)
    (3, 1, 1, 2, 17, 5),   # 3x3x3 stride 1: 27 taps, 26 neighbours
    (3, 2, 1, 1, 5, 17),   # 3x3x3 stride 2: eight parity classes in the input gradient (fp16 too)
    (3, 1, 1, 8, 17, 3),   # 1-voxel patches: every tap but the centre reads a neighbour
    (1, 1, 0, 4, 17, 5),   # 1x1x1
    (1, 2, 0, 4, 5, 17),   # 1x1x1 stride 2: seven classes without taps get zero gradient
])
def test_conv3d_matches_dense(k, s, pad, stride, cin, cout, rng):
    dtypes = (torch.float32, torch.float16) if (k, s) == (3, 2) else (torch.float32,)
    compare(lambda: Conv3d(cin, cout, k, s, pad, bias=True), cin, stride, rng, dtypes=dtypes)


def test_max_pool3d_matches_dense(rng):
    compare(lambda: MaxPool3d(3, 2, 1), 5, 1, rng)
    compare(lambda: nn.Sequential(ReLU(), MaxPool3d(3, 2, 1)), 3, 2, rng)  # ties at 0 break like torch's


class _Block(nn.Module):
    """relu(bn1(conv1(x)) + bn2(conv2(x))): conv-epilogue statistics and the two-BN fused apply, on volumes."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = Conv3d(c, c, 3, 1, 1, bias=False), random_batchnorm(c)
        self.conv2, self.bn2 = Conv3d(c, c, 1, bias=False), random_batchnorm(c)
        self.relu = ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)) + self.bn2(self.conv2(x)))


@pytest.mark.parametrize("train", [True, False])
def test_conv_bn_add_relu_block_matches_dense(train, rng):
    block = _Block(5)
    for name in ("bn1", "bn2"):  # BatchNorm3d with the same state (the rows do not care about dimensionality)
        bn3 = BatchNorm3d(5)
        bn3.load_state_dict(getattr(block, name).state_dict())
        setattr(block, name, bn3)
    compare(lambda: block, 5, 2, rng, train=train)


def test_conv_instance_norm_matches_dense(rng):
    """InstanceNorm3d on the triton backend (the torch path's row ops) after a Triton conv, forward and backward."""
    def make():
        norm = InstanceNorm3d(5, affine=True)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return nn.Sequential(Conv3d(3, 5, 3, 1, 1, bias=False), norm, ReLU())

    compare(make, 3, 2, rng)


def test_pack_to_dense_and_densify_round_trip_volumes(rng):
    images = torch.randn(2, 3, *SIZE, generator=rng)
    active = volume_masks(rng)[0]
    mask = PatchIndex(active, PATCH).dense_mask(1, images.dtype)
    for x in (images, images.to(memory_format=torch.channels_last_3d)):
        s = sparse_at(x, active, "triton", 1, PATCH)
        assert torch.equal(s.values, sparse_at(x, active, "torch", 1, PATCH).values)
        dense = s.to_dense()
        assert dense.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(dense, images * mask)
    # densify with a token at stride 2, forward and backward, against dense in float64
    token = torch.randn(3, generator=rng, dtype=F64)
    weight = torch.randn(2, 3, *(s // 2 for s in SIZE), generator=rng, dtype=F64)
    outs = {}
    for backend, dt in (("dense", F64), ("triton", torch.float32)):
        x = images.to(dt).requires_grad_(True)
        tok = token.clone().requires_grad_(True)
        y = get_backend(backend).densify(sparse_at(x, active, backend, 2, PATCH), tok)
        (y * weight.to(y.dtype)).sum().backward()
        outs[backend] = (y.detach(), x.grad, tok.grad)
    for a, b in zip(outs["triton"], outs["dense"]):
        assert rel_err(a, b) < 2e-5


def test_tap_tables_cover_every_kernel_tap_once():
    from ctssl.kernels.conv import ConvGeometry, tap_table

    for s in (1, 2):
        geom = ConvGeometry(8, (3, 3, 3), s, (1, 1, 1), (1, 1, 1))
        fwd = tap_table(geom, torch.device("cpu"), transposed=False)
        assert fwd.taps.shape == (1, 27, 4) and sorted(fwd.taps[0, :, 2].tolist()) == list(range(27))
        dgrad = tap_table(geom, torch.device("cpu"), transposed=True)
        assert dgrad.taps.shape[0] == s ** 3 and int(dgrad.counts.sum()) == 27  # each tap in one parity class
    img = tap_table(ConvGeometry(8, (3, 3), 1, (1, 1), (1, 1)), torch.device("cpu"), transposed=False)
    assert img.taps.shape == (1, 9, 3)  # images keep their (dy, dx, tap) rows


def test_kernels_refuse_tables_of_the_other_dimensionality():
    from ctssl.kernels.conv import ConvGeometry, conv_forward

    geom = ConvGeometry(8, (3, 3, 3), 1, (1, 1, 1), (1, 1, 1))
    x = torch.zeros(512, 4)
    with pytest.raises(ValueError, match="neighbours has 9 entries, expected 1 x 27"):
        conv_forward(x, torch.zeros(27, 4, 4), None, torch.full((9,), -1, dtype=torch.int32), geom, 1)
    with pytest.raises(ValueError, match="x has 512 rows, expected 2 patches x 8x8x8 = 1024"):
        conv_forward(x, torch.zeros(27, 4, 4), None, torch.full((54,), -1, dtype=torch.int32), geom, 2)

