"""The operators' CPU loops (the index math the GPU kernels share) against the dense reference.

Every op runs through the cuda backend's Python glue (``CpuTwin``) or directly through
``torch.ops.ctssl``, forward and backward, in float64 on random masks and the edge cases
(an image with no visible patch, one with all, a single visible patch).
"""
import pytest
import torch

from ctssl.cuda_ops.batchnorm import row_batch_norm
from ctssl.cuda_ops.tables import neighbour_table, patch_tables
from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.batchnorm_rows import batch_norm_rows
from ctssl.sparse.halo import halo_gather
from ctssl.sparse.index import neighbour_radius
from ctssl.sparse.modules import BatchNorm2d, Conv2d, LayerNorm2d, MaxPool2d

from ..sparse.helpers import random_batchnorm
from .helpers import CpuTwin, edge_masks, needs_ext, rel_err, sparse_at

pytestmark = needs_ext
DT = torch.float64
TWIN = CpuTwin()


def _compare(module_fn, stride, cin, gen, size=(64, 96), batch=3, train=True, relu_input=False, tol=1e-12):
    """Module on the dense reference vs on the twin: output, input grad, parameter grads, buffers."""
    H, W = size
    images = torch.randn(batch, cin, H, W, generator=gen, dtype=DT)
    for active in edge_masks(batch, H // 32, W // 32, gen):
        ref = module_fn().to(DT).train(train)
        outs = {}
        for name, backend in (("dense", get_backend("dense")), ("twin", TWIN)):
            module = module_fn().to(DT).train(train)
            module.load_state_dict(ref.state_dict())
            x = images.clone().requires_grad_(True)
            xs = sparse_at(x, active, backend, stride)
            if relu_input:
                xs = backend.relu(xs)
            y = module(xs)
            dense = y.to_dense()
            w = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
            (dense * w).sum().backward()
            grads = {n: p.grad for n, p in module.named_parameters()}
            outs[name] = (dense.detach(), x.grad, grads, dict(module.named_buffers()), y.stride)
        d, t = outs["dense"], outs["twin"]
        assert d[4] == t[4]
        assert rel_err(t[0], d[0]) < tol
        assert rel_err(t[1], d[1]) < tol
        for name in d[2]:
            assert rel_err(t[2][name], d[2][name]) < tol, name
        for name in d[3]:
            assert rel_err(t[3][name].double(), d[3][name].double()) < tol, name
        mask = PatchIndex(active).dense_mask(t[4])
        assert (t[0] * ~mask).abs().max() == 0


def test_patch_tables_match_the_index(rng):
    for shape in ((3, 2, 3), (2, 4, 4), (1, 1, 1)):
        for active in edge_masks(*shape, rng) + [torch.zeros(shape, dtype=torch.bool)]:
            index = PatchIndex(active)
            t = patch_tables(index)
            assert t.slot.dtype == torch.int32 and t.neighbours.dtype == torch.int32
            assert torch.equal(t.slot.long(), index.slot)
            assert torch.equal(t.patch_ids, index.patch_ids)
            assert torch.equal(t.neighbours.long(), index.neighbours)
            assert patch_tables(index) is t  # cached once per batch


def test_neighbour_tables_of_every_radius_match_the_index(rng):
    for shape in ((3, 2, 3), (2, 4, 5), (1, 1, 1)):
        for active in edge_masks(*shape, rng) + [torch.zeros(shape, dtype=torch.bool)]:
            index = PatchIndex(active)
            for r in (0, 1, 2, 3, 5):
                table = neighbour_table(index, r)
                assert table.dtype == torch.int32 and table.is_contiguous()
                assert torch.equal(table.long(), index.neighbour_table(max(r, 1)))  # 0 and 1 share the 3x3 table
                assert neighbour_table(index, r) is table  # built once per batch and radius
                t = patch_tables(index)
                direct = torch.ops.ctssl.neighbour_table(t.slot, t.patch_ids, r)
                assert torch.equal(direct.long(), index.neighbour_table(r))
            assert neighbour_table(index, 1) is patch_tables(index).neighbours


@pytest.mark.parametrize("p,halo", [(1, 0), (1, 1), (2, 1), (2, 2), (4, 1), (8, 3), (32, 3),
                                    (1, 2), (1, 3), (2, 3), (2, 4), (4, 7)])  # radius 2 and 3 tables
def test_halo_gather_matches_torch_plan_and_scatter_is_its_adjoint(p, halo, rng):
    active = edge_masks(3, 2, 3, rng)[1]
    index = PatchIndex(active)
    nbr = neighbour_table(index, neighbour_radius(p, halo))
    rows = torch.randn(index.num_patches * p * p, 5, generator=rng, dtype=DT)
    out = torch.ops.ctssl.halo_gather(rows, nbr, p, halo)
    assert torch.equal(out, halo_gather(rows, index.halo_plan(p, halo), index.num_patches, 0.0))
    g = torch.randn(out.shape, generator=rng, dtype=DT)
    back = torch.ops.ctssl.halo_scatter(g, nbr, p, halo)
    assert torch.allclose((out * g).sum(), (rows * back).sum(), rtol=1e-12)
    r = rows.clone().requires_grad_(True)
    (halo_gather(r, index.halo_plan(p, halo), index.num_patches, 0.0) * g).sum().backward()
    assert torch.allclose(back, r.grad, rtol=1e-12, atol=1e-12)


def test_halo_gather_reads_the_same_from_a_wider_table(rng):
    """A radius-3 table serves a 1-pixel halo exactly like the 3x3 one (windows never read past the halo)."""
    active = edge_masks(2, 4, 4, rng)[0]
    index = PatchIndex(active)
    rows = torch.randn(index.num_patches * 4, 3, generator=rng, dtype=DT)
    small, wide = neighbour_table(index, 1), neighbour_table(index, 3)
    out = torch.ops.ctssl.halo_gather(rows, wide, 2, 1)
    assert torch.equal(out, torch.ops.ctssl.halo_gather(rows, small, 2, 1))
    g = torch.randn(out.shape, generator=rng, dtype=DT)
    assert torch.equal(torch.ops.ctssl.halo_scatter(g, wide, 2, 1), torch.ops.ctssl.halo_scatter(g, small, 2, 1))


def test_layout_round_trip_and_gradients_match_torch_backend(rng):
    images = torch.randn(3, 4, 64, 96, generator=rng, dtype=DT)
    for active in edge_masks(3, 2, 3, rng):
        outs = {}
        for name, be in (("torch", get_backend("torch")), ("twin", TWIN)):
            x = images.clone().requires_grad_(True)
            token = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
            s = be.sparse_input(x, PatchIndex(active))
            dense = be.to_dense(s)
            filled = be.densify(s, token)
            w1 = torch.randn(dense.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
            w2 = torch.randn(dense.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
            ((dense * w1).sum() + (filled * w2).sum()).backward()
            outs[name] = (s.values.detach(), dense.detach(), filled.detach(), x.grad, token.grad)
        for a, b in zip(outs["twin"], outs["torch"]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # channels-last images pack the same
    cl = images.to(memory_format=torch.channels_last)
    idx = PatchIndex(edge_masks(3, 2, 3, rng)[0])
    assert torch.equal(TWIN.sparse_input(cl, idx).values, TWIN.sparse_input(images, idx).values)


@pytest.mark.parametrize("k,s,p,stride", [
    (7, 2, 3, 1),   # stem
    (3, 1, 1, 4), (3, 2, 1, 8), (3, 1, 1, 32),  # 3x3, incl. 1-pixel patches at stride 32
    (1, 1, 0, 4), (1, 2, 0, 16),  # 1x1 as GEMM, with and without stride
    (2, 2, 0, 2),  # no halo, framework conv on the patches
])
def test_conv_matches_dense(k, s, p, stride, rng):
    _compare(lambda: Conv2d(3, 5, k, s, p, bias=True), stride, 3, rng)


def test_grouped_and_dilated_conv_matches_dense(rng):
    _compare(lambda: Conv2d(4, 6, 3, 1, 1, groups=2, bias=False), 4, 4, rng)
    _compare(lambda: Conv2d(3, 4, 3, 1, 2, dilation=2), 4, 3, rng)
    _compare(lambda: Conv2d(4, 4, 1, 1, 0, groups=4), 4, 4, rng)


@pytest.mark.parametrize("k,stride", [(7, 4), (7, 8), (7, 16), (7, 32), (5, 32), (3, 16)])
def test_depthwise_conv_matches_dense(k, stride, rng):
    """ConvNeXt's depthwise conv: the halo reaches ceil((k // 2) / p) patches (3 at stride 32 for 7x7)."""
    _compare(lambda: Conv2d(4, 4, k, 1, k // 2, groups=4, bias=True), stride, 4, rng)


def test_depthwise_conv_reaches_three_patches_on_a_wide_grid(rng):
    """A 7x7 depthwise conv at 1-pixel patches on a 4 x 5 grid: taps 3 patches away in every direction."""
    _compare(lambda: Conv2d(3, 3, 7, 1, 3, groups=3, bias=False), 32, 3, rng, size=(128, 160), batch=2)


def test_layer_norm_matches_dense(rng):
    def ln():
        m = LayerNorm2d(5, eps=1e-6)
        with torch.no_grad():
            m.weight.normal_(1.0, 0.5, generator=rng)
            m.bias.normal_(0.0, 0.5, generator=rng)
        return m

    _compare(ln, 4, 5, rng)
    _compare(ln, 32, 5, rng)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_matches_dense(train, momentum, rng):
    _compare(lambda: random_batchnorm(3, momentum=momentum), 4, 3, rng, train=train, tol=1e-11)


def test_batchnorm_without_affine_or_running_stats_matches_dense(rng):
    _compare(lambda: BatchNorm2d(3, affine=False, track_running_stats=False), 8, 3, rng, tol=1e-11)


def test_batchnorm_with_one_or_zero_visible_rows_is_finite():
    images = torch.randn(1, 3, 32, 32, dtype=DT)
    for active in (torch.ones(1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool)):
        bn = BatchNorm2d(3).to(DT)
        y = bn(sparse_at(images, active, TWIN, 32)).to_dense()
        assert torch.isfinite(y).all()
        assert torch.equal(bn.running_mean, torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_batchnorm_residual_activation_matches_composition(activation, train, rng):
    M, C = 300, 6
    rows = (torch.randn(M, C, generator=rng, dtype=DT) * 3 + 1)
    res = torch.randn(M, C, generator=rng, dtype=DT) * 2
    wb = (torch.rand(C, generator=rng, dtype=DT) + 0.5, torch.randn(C, generator=rng, dtype=DT))
    stats = (torch.randn(C, generator=rng, dtype=DT), torch.rand(C, generator=rng, dtype=DT) + 0.5)
    gy = torch.randn(M, C, generator=rng, dtype=DT)
    results = []
    for fused in (True, False):
        x, r = rows.clone().requires_grad_(True), res.clone().requires_grad_(True)
        w, b = (t.clone().requires_grad_(True) for t in wb)
        rm, rv = (t.clone() for t in stats)
        if fused:
            y = row_batch_norm(x, w, b, rm, rv, train, 0.1, 1e-5, activation=activation, residual=r)
        else:
            y = batch_norm_rows(x, w, b, rm, rv, train, 0.1, 1e-5) + r
            y = {None: lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6)}[activation](y)
        (y * gy).sum().backward()
        results.append((y.detach(), x.grad, r.grad, w.grad, b.grad, rm, rv))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_batchnorm_low_precision_storage_matches_float64(rng):
    """Storage in fp32/fp16/bf16, statistics and sums in fp32: close to float64 on the same stored inputs."""
    rows64 = torch.randn(500, 40, generator=rng, dtype=DT) * 2 + 3
    gy64 = torch.randn(500, 40, generator=rng, dtype=DT)
    w, b = torch.rand(40, dtype=torch.float32) + 0.5, torch.randn(40, dtype=torch.float32)

    def run(rows, gy, params):
        x = rows.detach().clone().requires_grad_(True)
        y = row_batch_norm(x, *params, None, None, True, 0.1, 1e-5, activation="relu")
        (y * gy).sum().backward()
        return y.detach(), x.grad

    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        rows, gy = rows64.to(dtype), gy64.to(dtype)
        y, gx = run(rows, gy, (w, b))
        ref = run(rows.double(), gy.double(), (w.double(), b.double()))
        assert y.dtype == dtype and gx.dtype == dtype
        assert rel_err(y, ref[0]) < tol and rel_err(gx, ref[1]) < tol, dtype


def test_max_pool_matches_dense(rng):
    _compare(lambda: MaxPool2d(3, 2, 1), 2, 3, rng)
    _compare(lambda: MaxPool2d(3, 2, 1), 1, 3, rng, relu_input=True)  # ties between real and masked zeros
    _compare(lambda: MaxPool2d(3, 1, 1), 8, 3, rng)
    _compare(lambda: MaxPool2d(2, 2, 0), 4, 3, rng)


def test_max_pool_reads_minus_inf_outside_and_zero_in_masked_neighbours():
    images = -torch.ones(1, 1, 64, 64, dtype=DT) - torch.rand(1, 1, 64, 64, dtype=DT)
    active = torch.tensor([[[True, False], [True, True]]])
    y = MaxPool2d(3, 2, 1)(sparse_at(images, active, TWIN)).to_dense()
    assert y[0, 0, 0, 0] < -1  # only in-image negative values (outside is -inf)
    assert y[0, 0, 16, 20] == 0  # reads the masked patch above: 0 wins
    assert y[0, 0, 16, 4] < -1  # reads the visible patch above: stays negative


def test_max_pool_and_layout_in_half_and_bfloat16(rng):
    images = torch.randn(2, 8, 64, 64, generator=rng, dtype=DT)
    active = edge_masks(2, 2, 2, rng)[0]
    ref = MaxPool2d(3, 2, 1)(sparse_at(images, active, "dense")).to_dense()
    for dtype in (torch.float16, torch.bfloat16):
        y = MaxPool2d(3, 2, 1)(sparse_at(images.to(dtype), active, TWIN)).to_dense()
        assert y.dtype == dtype
        assert torch.equal(y, ref.to(dtype))  # max and layout moves are exact in any dtype
