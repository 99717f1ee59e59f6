"""Sparse modules on volumes (Conv3d, BatchNorm3d, SyncBatchNorm, MaxPool3d, AvgPool3d, LeakyReLU, residual
add): the torch backend against the dense reference in float64, forward and backward, on random masks,
a volume with no visible patch and a batch with none; and the refusal of maps of the other dimensionality.

Patches of side 8 keep the volumes small; the engine takes any patch size.
"""
import copy

import pytest
import torch
from torch import nn

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import (
    AvgPool2d,
    AvgPool3d,
    BatchNorm2d,
    BatchNorm3d,
    Conv2d,
    Conv3d,
    InstanceNorm3d,
    LeakyReLU,
    MaxPool2d,
    MaxPool3d,
    ReLU,
    SyncBatchNorm,
    convert_sync_batchnorm,
)

from .helpers import rel_err, sparse_at

F64 = torch.float64
PATCH = 8
GRID = (2, 2, 3)


def volume_masks(batch: int, grid, gen: torch.Generator) -> list[torch.Tensor]:
    """A random mask with a first volume that shows nothing, and a batch that shows nothing at all."""
    random = torch.rand(batch, *grid, generator=gen) < 0.5
    random[0] = False
    random[-1].view(-1)[0] = True
    return [random, torch.zeros(batch, *grid, dtype=torch.bool)]


def run(module, images, active, backend, stride):
    """Forward + backward of ``module`` on the sparse map at ``stride``: output, image/param grads, buffers."""
    m = copy.deepcopy(module)
    x = images.detach().clone().requires_grad_(True)
    y = m(sparse_at(x, active, backend, stride, PATCH))
    dense = y.to_dense()
    w = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7), dtype=dense.dtype)
    (dense * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    return dense.detach(), x.grad, grads, buffers, y.stride


def compare(make, cin, stride, gen, batch=2, grid=GRID, train=True):
    """``make()`` on the torch backend equals the dense reference on every mask (float64)."""
    images = torch.randn(batch, cin, *(g * PATCH for g in grid), generator=gen, dtype=F64)
    module = make().to(F64).train(train)
    for active in volume_masks(batch, grid, gen):
        ref = run(module, images, active, "dense", stride)
        out = run(module, images, active, "torch", stride)
        assert out[4] == ref[4]
        assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12
        assert out[2].keys() == ref[2].keys()
        for name in ref[2]:
            assert rel_err(out[2][name], ref[2][name]) < 1e-11, name
        for name in ref[3]:
            assert rel_err(out[3][name].double(), ref[3][name].double()) < 1e-12, name
        mask = PatchIndex(active, PATCH).dense_mask(out[4])
        assert (out[0] * ~mask).abs().max() == 0 and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("k,s,pad,stride,groups", [
    (7, 2, 3, 1, 1),  # the stem
    (3, 1, 1, 2, 1), (3, 2, 1, 2, 1), (3, 1, 1, 8, 1),  # 3x3x3, incl. 1-voxel patches
    (1, 1, 0, 4, 1), (1, 2, 0, 2, 1),  # 1x1x1, with and without stride
    (3, 1, 1, 2, 2),  # grouped
])
def test_conv3d_matches_dense(k, s, pad, stride, groups, rng):
    for bias in (True, False):
        compare(lambda: Conv3d(4, 6, k, s, pad, groups=groups, bias=bias), 4, stride, rng)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm3d_matches_dense(train, momentum, rng):
    def make():
        bn = BatchNorm3d(3, momentum=momentum)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        return bn
    compare(make, 3, 2, rng, train=train)


def random_instance_norm(c, affine=True):
    norm = InstanceNorm3d(c, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride", [2, 8])  # 8: one row per visible patch
def test_instance_norm3d_matches_dense(affine, stride, rng):
    compare(lambda: random_instance_norm(3, affine), 3, stride, rng)
    compare(lambda: random_instance_norm(3, affine), 3, stride, rng, train=False)  # no running statistics: same


def test_instance_norm3d_is_each_samples_own_normalisation(rng):
    """Against the textbook formula on each sample's gathered visible voxels, channel by channel, forward and
    backward (independent of the engine's row code)."""
    images = torch.randn(3, 2, 16, 16, 24, generator=rng, dtype=F64) * 3 + 1
    active = volume_masks(3, GRID, rng)[0]
    mask = PatchIndex(active, PATCH).dense_mask(1).squeeze(1)
    norm = random_instance_norm(2).double()
    weights = torch.randn(images.shape, generator=rng, dtype=F64)

    def textbook(x, w, b):
        planes = []
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[i, c][mask[i]]
                plane = torch.zeros_like(x[i, c])
                if v.numel():
                    z = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + norm.eps) * w[c] + b[c]
                    plane = plane.masked_scatter(mask[i], z)
                planes.append(plane)
        return torch.stack(planes).view(x.shape)

    def engine(x, w, b):
        return get_backend("torch").instance_norm(sparse_at(x, active, "torch", 1, PATCH), w, b, norm.eps).to_dense()

    out = {}
    for name, fn in (("engine", engine), ("textbook", textbook)):
        x = images.clone().requires_grad_(True)
        w, b = (p.detach().clone().requires_grad_(True) for p in (norm.weight, norm.bias))
        y = fn(x, w, b)
        (y * weights).sum().backward()
        out[name] = (y.detach(), x.grad, w.grad, b.grad)
    for a, r in zip(out["engine"], out["textbook"]):
        assert rel_err(a, r) < 1e-12


def test_instance_norm3d_with_everything_visible_is_torchs(rng):
    images = torch.randn(2, 3, 16, 16, 16, generator=rng, dtype=F64)
    norm = random_instance_norm(3).double()
    ours = norm(sparse_at(images, torch.ones(2, 2, 2, 2, dtype=torch.bool), "torch", 1, PATCH)).to_dense()
    assert rel_err(ours, norm(images)) < 1e-12  # on a dense tensor the module is nn.InstanceNorm3d


def test_instance_norm3d_refusals():
    x = sparse_at(torch.randn(1, 3, 16, 16, 16), torch.ones(1, 2, 2, 2, dtype=torch.bool), "torch", 1, PATCH)
    with pytest.raises(ValueError, match="track_running_stats=True is not supported on sparse maps"):
        InstanceNorm3d(3, track_running_stats=True)(x)
    with pytest.raises(ValueError, match="InstanceNorm3d: expected 4 channels, got 3"):
        InstanceNorm3d(4)(x)
    image = sparse_at(torch.randn(1, 3, 16, 16), torch.ones(1, 2, 2, dtype=torch.bool), "torch", 1, PATCH)
    with pytest.raises(ValueError, match="InstanceNorm3d takes sparse maps of 3-D volumes, got one of 2-D images"):
        InstanceNorm3d(3)(image)
    assert list(InstanceNorm3d(3, affine=True).state_dict()) == list(nn.InstanceNorm3d(3, affine=True).state_dict())


@pytest.mark.parametrize("stride", [1, 4])
def test_max_pool3d_matches_dense(stride, rng):
    compare(lambda: MaxPool3d(3, 2, 1), 3, stride, rng)
    compare(lambda: nn.Sequential(ReLU(), MaxPool3d(3, 2, 1)), 3, stride, rng)  # ties at 0, as in the stem


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool3d_matches_dense(count_include_pad, rng):
    compare(lambda: AvgPool3d(3, 2, 1, count_include_pad=count_include_pad), 3, 2, rng)


class _Block(nn.Module):
    """conv -> BN -> LeakyReLU -> conv -> BN, plus the input: a residual block of an nnU-Net-style encoder."""

    def __init__(self, c, inplace):
        super().__init__()
        self.conv1, self.bn1 = Conv3d(c, c, 3, 1, 1, bias=False), BatchNorm3d(c)
        self.act = LeakyReLU(0.1, inplace=inplace)
        self.conv2, self.bn2 = Conv3d(c, c, 3, 1, 1, bias=False), BatchNorm3d(c)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("inplace", [False, True])
def test_leaky_relu_and_residual_add_match_dense(inplace, rng):
    compare(lambda: _Block(4, inplace), 4, 2, rng)


def test_leaky_relu_keeps_negative_slopes_and_masked_zeros(rng):
    images = torch.randn(2, 3, 16, 16, 24, generator=rng, dtype=F64)
    active = volume_masks(2, GRID, rng)[0]
    y = LeakyReLU(0.2)(sparse_at(images, active, "torch", 1, PATCH)).to_dense()
    mask = PatchIndex(active, PATCH).dense_mask(1)
    assert torch.equal(y, nn.functional.leaky_relu(images, 0.2) * mask)
    assert (y < 0).any()


def test_sync_batchnorm_without_group_equals_batchnorm3d_on_volumes(rng):
    images = torch.randn(2, 3, 16, 16, 24, generator=rng, dtype=F64)
    active = volume_masks(2, GRID, rng)[0]
    a = run(SyncBatchNorm(3).double(), images, active, "torch", 2)
    b = run(BatchNorm3d(3).double(), images, active, "torch", 2)
    for u, v in zip(a[:2], b[:2]):
        assert torch.equal(u, v)
    assert SyncBatchNorm(3)(images.float()).shape == images.shape  # dense volumes too


def test_convert_sync_batchnorm_keeps_batchnorm3d_state():
    model = nn.Sequential(Conv3d(1, 4, 3, 1, 1), BatchNorm3d(4), nn.BatchNorm3d(4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[2].weight.fill_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert_sync_batchnorm(model)
    assert type(out[1]) is SyncBatchNorm and type(out[2]) is SyncBatchNorm
    assert type(out[3]) is nn.BatchNorm1d  # not a spatial BN: left alone
    assert out.state_dict().keys() == before.keys()
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dense_tensors_get_torchs_modules():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, 8)
    for ours, theirs in ((Conv3d(2, 3, 3, 2, 1), nn.Conv3d(2, 3, 3, 2, 1)), (BatchNorm3d(2), nn.BatchNorm3d(2)),
                         (MaxPool3d(3, 2, 1), nn.MaxPool3d(3, 2, 1)), (AvgPool3d(2), nn.AvgPool3d(2)),
                         (LeakyReLU(0.3), nn.LeakyReLU(0.3))):
        theirs.load_state_dict(ours.state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("module,twin", [
    (Conv2d(3, 3, 3, 1, 1), "Conv3d"), (BatchNorm2d(3), "BatchNorm3d"), (MaxPool2d(3, 2, 1), "MaxPool3d"),
    (AvgPool2d(2), "AvgPool3d"),
])
def test_2d_modules_refuse_volumes(module, twin):
    x = sparse_at(torch.randn(1, 3, 16, 16, 16), torch.ones(1, 2, 2, 2, dtype=torch.bool), "torch", 1, PATCH)
    name = type(module).__name__
    with pytest.raises(ValueError, match=f"^{name} takes sparse maps of 2-D images, got one of 3-D volumes "
                                         rf"\(dense shape \(1, 3, 16, 16, 16\)\); use {twin}$"):
        module(x)


@pytest.mark.parametrize("module", [Conv3d(3, 3, 3, 1, 1), BatchNorm3d(3), MaxPool3d(3, 2, 1), AvgPool3d(2)])
def test_3d_modules_refuse_images(module):
    x = sparse_at(torch.randn(1, 3, 16, 16), torch.ones(1, 2, 2, dtype=torch.bool), "dense", 1, PATCH)
    with pytest.raises(ValueError, match=f"{type(module).__name__} takes sparse maps of 3-D volumes, got one of "
                                         "2-D images"):
        module(x)


def test_backend_ops_name_a_kernel_of_the_wrong_dimensionality():
    from ctssl.sparse import get_backend

    x = sparse_at(torch.randn(1, 3, 16, 16, 16), torch.ones(1, 2, 2, 2, dtype=torch.bool), "torch", 1, PATCH)
    with pytest.raises(ValueError, match=r"conv3d: kernel \(3, 3\) has 2 axes but the map has 3 spatial axes"):
        get_backend("torch").conv3d(x, torch.randn(3, 3, 3, 3), None, 1, 1, 1, 1)
