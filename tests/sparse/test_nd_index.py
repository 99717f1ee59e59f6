"""The generalised engine core: 2-D and 3-D patch grids, neighbourhoods of any radius.

Checked against brute force and against the ``dense`` reference in float64, forward and
backward. Small patch sizes (8) keep the 3-D cases fast; the engine takes any patch size.
"""
import itertools

import pytest
import torch

from ctssl.sparse import PatchIndex, get_backend, random_patch_mask, sparse_input
from ctssl.sparse.halo import halo_gather
from ctssl.sparse.index import INACTIVE, OUTSIDE, neighbour_radius

from .helpers import rel_err

DT = torch.float64
PATCH = 8


def _masks(batch, grid, gen):
    """A random mask, one where the first sample has no visible patch, and one with a single patch."""
    random = torch.rand(batch, *grid, generator=gen) < 0.5
    edge = random.clone()
    edge[0] = False
    single = torch.zeros(batch, *grid, dtype=torch.bool)
    single[-1].view(-1)[-1] = True
    return [random, edge, single]


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 3)])
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_neighbour_table_matches_brute_force(grid, radius, rng):
    active = torch.rand(2, *grid, generator=rng) < 0.6
    idx = PatchIndex(active, PATCH)
    table = idx.neighbour_table(radius)
    side = 2 * radius + 1
    assert table.shape == (idx.num_patches, *([side] * len(grid)))
    for n, (b, *pos) in enumerate(idx.coords.tolist()):
        for off in itertools.product(range(-radius, radius + 1), repeat=len(grid)):
            q = [c + o for c, o in zip(pos, off)]
            if any(c < 0 or c >= g for c, g in zip(q, grid)):
                want = OUTSIDE
            else:
                want = int(idx.slot[(b, *q)])
                assert want == INACTIVE or active[(b, *q)]
            assert int(table[(n, *[o + radius for o in off])]) == want
    assert idx.neighbour_table(radius) is table  # built once per radius


def test_neighbours_is_the_radius_one_table(rng):
    idx = PatchIndex(torch.rand(2, 3, 3, generator=rng) < 0.5, PATCH)
    assert idx.neighbours.shape == (idx.num_patches, 3, 3)
    assert idx.neighbours is idx.neighbour_table(1)


@pytest.mark.parametrize("p,halo,expected", [(8, 1, 1), (8, 3, 1), (2, 3, 2), (1, 3, 3), (4, 0, 0), (4, 5, 2)])
def test_neighbour_radius(p, halo, expected):
    assert neighbour_radius(p, halo) == expected


@pytest.mark.parametrize("grid,stride,halo", [
    ((3, 4), 1, 3),   # halo within one neighbour
    ((3, 4), 4, 3),   # p = 2: two patches away (ConvNeXt's 7x7 at stride 16)
    ((3, 4), 8, 3),   # p = 1: three patches away (stride 32)
    ((2, 3, 3), 1, 1),
    ((2, 3, 3), 4, 3),
    ((2, 2, 3), 8, 2),
])
def test_halo_gather_equals_the_padded_dense_map(grid, stride, halo, rng):
    """Each gathered halo patch is the masked dense map around that patch, padded with the pad value."""
    nd = len(grid)
    for active in _masks(2, grid, rng):
        idx = PatchIndex(active, PATCH)
        p = idx.patch_side(stride)
        C = 3
        dense = torch.randn(2, C, *idx.dense_grid(stride), generator=rng, dtype=DT) * idx.dense_mask(stride, DT)
        packed = _pack(dense, idx, stride)
        padded = torch.nn.functional.pad(dense, (halo, halo) * nd, value=-7.0)
        got = halo_gather(packed, idx.halo_plan(p, halo), idx.num_patches, -7.0)
        for n, (b, *pos) in enumerate(idx.coords.tolist()):
            window = tuple(slice(c * p, c * p + p + 2 * halo) for c in pos)
            want = padded[(b, slice(None)) + window].movedim(0, -1)
            assert torch.equal(got[n], want), (n, pos)


def _pack(dense, idx, stride):
    """Rows of a dense map in the packed order: slot by slot, row-major inside each patch."""
    p = idx.patch_side(stride)
    out = []
    for b, *pos in idx.coords.tolist():
        window = tuple(slice(c * p, c * p + p) for c in pos)
        out.append(dense[(b, slice(None)) + window].movedim(0, -1).reshape(-1, dense.shape[1]))
    return torch.cat(out) if out else dense.new_zeros(0, dense.shape[1])


def test_halo_gather_backward_sums_every_read(rng):
    idx = PatchIndex(torch.rand(2, 2, 3, 3, generator=rng) < 0.6, PATCH)
    rows = torch.randn(idx.num_patches * 8, 2, generator=rng, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: halo_gather(r, idx.halo_plan(2, 3), idx.num_patches, 1.5), (rows,))


def _compare_op(op, images, active, cin, stride, weight_shape=None, bias=True, **kw):
    """``op`` on the torch backend against dense, forward and backward, in float64."""
    outs = {}
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(weight_shape, generator=gen, dtype=DT) if weight_shape else None
    b = torch.randn(weight_shape[0], generator=gen, dtype=DT) if (weight_shape and bias) else None
    for name in ("dense", "torch"):
        be = get_backend(name)
        x = images.clone().requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in (weight, b) if t is not None]
        s = be.sparse_input(x, PatchIndex(active, PATCH))
        if stride > 1:
            pool = be.avg_pool3d if s.ndim == 3 else be.avg_pool2d
            s = pool(s, stride, stride, 0)
        y = op(be, s, *params, **kw)
        dense = y.to_dense()
        w = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
        (dense * w).sum().backward()
        outs[name] = (dense.detach(), x.grad, [q.grad for q in params], y.stride)
    d, t = outs["dense"], outs["torch"]
    assert d[3] == t[3]
    assert rel_err(t[0], d[0]) < 1e-12 and rel_err(t[1], d[1]) < 1e-12
    for gt, gd in zip(t[2], d[2]):
        assert rel_err(gt, gd) < 1e-12
    mask = PatchIndex(active, PATCH).dense_mask(t[3])
    assert (t[0] * ~mask).abs().max() == 0
    return t[0]


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_depthwise_7x7_reaches_up_to_three_patches(stride, rng):
    """ConvNeXt's depthwise 7x7 conv (groups = channels) at every patch side, 8 down to 1 pixel."""
    C = 4
    images = torch.randn(2, C, 3 * PATCH, 4 * PATCH, generator=rng, dtype=DT)
    for active in _masks(2, (3, 4), rng):
        _compare_op(lambda be, s, w, b: be.conv2d(s, w, b, 1, 3, 1, C), images, active, C, stride, (C, 1, 7, 7))


@pytest.mark.parametrize("k,s,pad,stride", [
    (7, 2, 3, 1),  # the stem
    (3, 1, 1, 2), (3, 2, 1, 2), (3, 1, 1, 8),  # 3x3x3, incl. 1-voxel patches
    (1, 1, 0, 2), (1, 2, 0, 4),  # 1x1x1 as matmul, with and without stride
])
def test_conv3d_matches_dense(k, s, pad, stride, rng):
    images = torch.randn(2, 3, 2 * PATCH, 2 * PATCH, 3 * PATCH, generator=rng, dtype=DT)
    for active in _masks(2, (2, 2, 3), rng):
        _compare_op(lambda be, x, w, b: be.conv3d(x, w, b, s, pad, 1, 1), images, active, 3, stride,
                    (5, 3, k, k, k))


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pool3d_matches_dense(pool, rng):
    images = torch.randn(2, 3, 2 * PATCH, 2 * PATCH, 2 * PATCH, generator=rng, dtype=DT)
    for active in _masks(2, (2, 2, 2), rng):
        if pool == "max":
            _compare_op(lambda be, x: be.max_pool3d(x, 3, 2, 1), images, active, 3, 2)
        else:
            _compare_op(lambda be, x: be.avg_pool3d(x, 3, 2, 1, False), images, active, 3, 2)


def test_batch_norm_on_volumes_matches_dense(rng):
    images = torch.randn(2, 3, 2 * PATCH, 2 * PATCH, 2 * PATCH, generator=rng, dtype=DT)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    for active in _masks(2, (2, 2, 2), rng):
        _compare_op(lambda be, x, w, b: be.batch_norm(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5),
                    images, active, 3, 2, (3,))


def test_volume_layout_round_trips(rng):
    images = torch.randn(2, 3, 2 * PATCH, 3 * PATCH, 2 * PATCH, generator=rng, dtype=DT)
    active = random_patch_mask(2, (2, 3, 2), 0.5, generator=rng)
    assert active.shape == (2, 2, 3, 2) and int(active[0].sum()) == 6
    x = sparse_input(images, active, "torch", patch_size=PATCH)
    assert x.values.shape == (12 * PATCH ** 3, 3) and x.dense_shape == (2, 3, 16, 24, 16)
    dense = sparse_input(images, active, "dense", patch_size=PATCH).to_dense()
    assert torch.equal(x.to_dense(), dense)
    token = torch.arange(3, dtype=DT)
    filled = get_backend("torch").densify(x, token)
    mask = x.index.dense_mask(1)
    assert torch.equal(filled, torch.where(mask, dense, token.view(1, 3, 1, 1, 1)))


def test_backends_without_3d_ops_refuse_volumes_at_selection(rng):
    from ctssl.sparse.backends import Backend

    class TwoDOnly(Backend):
        name = "two-d-only"

    images = torch.randn(1, 1, PATCH, PATCH, PATCH)
    active = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="'two-d-only' does not implement sparse ops on 3-D volumes"):
        sparse_input(images, active, TwoDOnly(), patch_size=PATCH)


def test_volume_shape_errors_name_the_axes():
    images = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"active must have shape \(B, D/8, H/8, W/8\) = \(1, 2, 2, 2\)"):
        sparse_input(images, torch.ones(1, 2, 2, dtype=torch.bool), "torch", patch_size=8)
    with pytest.raises(ValueError, match="depth, height and width must be positive multiples of 8"):
        sparse_input(torch.randn(1, 1, 16, 12, 16), torch.ones(1, 2, 2, 2, dtype=torch.bool), "torch",
                     patch_size=8)
