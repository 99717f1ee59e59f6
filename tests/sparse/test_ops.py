"""Each sparse op of the torch backend against the dense reference, forward and backward."""
import pytest
import torch

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import AvgPool2d, BatchNorm2d, Conv2d, DropPath, MaxPool2d, ReLU, ReLU6

from .helpers import edge_masks, random_batchnorm, rel_err

DT = torch.float64


def _sparse(images, active, backend, stride=1):
    """A sparse map at ``stride``: build it at stride 1 and bring it down with identity pooling."""
    be = get_backend(backend)
    x = be.sparse_input(images, PatchIndex(active))
    if stride > 1:
        x = be.avg_pool2d(x, stride, stride, 0)
    return x


def _compare(module_fn, stride, cin, gen, size=(64, 96), batch=3, train=True):
    H, W = size
    images = torch.randn(batch, cin, H, W, generator=gen, dtype=DT)
    for active in edge_masks(batch, H // 32, W // 32, gen):
        outs = {}
        ref_module = module_fn().to(DT).train(train)
        for backend in ("dense", "torch"):
            module = module_fn().to(DT).train(train)
            module.load_state_dict(ref_module.state_dict())
            x = images.clone().requires_grad_(True)
            y = module(_sparse(x, active, backend, stride))
            dense = y.to_dense()
            w = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
            (dense * w).sum().backward()
            grads = {n: p.grad for n, p in module.named_parameters()}
            outs[backend] = (dense.detach(), x.grad, grads, dict(module.named_buffers()), y.stride)
        d, t = outs["dense"], outs["torch"]
        assert d[4] == t[4]
        assert rel_err(t[0], d[0]) < 1e-12
        assert rel_err(t[1], d[1]) < 1e-12
        for name in d[2]:
            assert rel_err(t[2][name], d[2][name]) < 1e-12, name
        for name in d[3]:
            assert rel_err(t[3][name].double(), d[3][name].double()) < 1e-12, name
        # masked positions are exactly zero
        mask = PatchIndex(active).dense_mask(t[4])
        assert (t[0] * ~mask).abs().max() == 0


@pytest.mark.parametrize("k,s,p,stride", [
    (7, 2, 3, 1),   # stem
    (3, 1, 1, 4), (3, 2, 1, 8), (3, 1, 1, 32),  # 3x3 incl. the 1-pixel patches of stride 32
    (1, 1, 0, 4), (1, 2, 0, 16),  # 1x1 as matmul, with and without stride
    (5, 1, 2, 2),
])
def test_conv_matches_dense(k, s, p, stride, rng):
    _compare(lambda: Conv2d(3, 5, k, s, p, bias=True), stride, 3, rng)


def test_grouped_and_dilated_conv_matches_dense(rng):
    _compare(lambda: Conv2d(4, 6, 3, 1, 1, groups=2, bias=False), 4, 4, rng)
    _compare(lambda: Conv2d(3, 4, 3, 1, 2, dilation=2), 4, 3, rng)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_dense(train, rng):
    _compare(lambda: random_batchnorm(3), 4, 3, rng, train=train)


def test_batchnorm_statistics_come_from_visible_pixels_only():
    images = torch.randn(2, 2, 64, 64, dtype=DT)
    active = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    images[:, :, 32:, :32] = 1e6  # masked: must not move the statistics
    bn = BatchNorm2d(2, momentum=1.0).to(DT)
    y = bn(_sparse(images, active, "torch")).to_dense()
    visible = torch.cat([images[0, :, :32, :32].reshape(2, -1), images[1, :, 32:, 32:].reshape(2, -1)], 1)
    assert torch.allclose(bn.running_mean, visible.mean(1))
    assert torch.allclose(bn.running_var, visible.var(1, unbiased=True))
    assert y[:, :, 32:, :32].abs().max() == 0


def test_batchnorm_cumulative_momentum_and_eval_masking(rng):
    _compare(lambda: BatchNorm2d(3, momentum=None), 4, 3, rng)
    _compare(lambda: BatchNorm2d(3, affine=False, track_running_stats=False), 4, 3, rng)


def test_batchnorm_with_one_or_zero_visible_rows_is_finite():
    images = torch.randn(1, 3, 32, 32, dtype=DT)
    for active in (torch.ones(1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool)):
        for backend in ("dense", "torch"):
            bn = BatchNorm2d(3).to(DT)
            x = _sparse(images, active, backend, stride=32)  # one pixel per image at stride 32
            y = bn(x).to_dense()
            assert torch.isfinite(y).all()
            assert torch.equal(bn.running_mean, torch.zeros(3, dtype=DT))


def test_pooling_matches_dense(rng):
    _compare(lambda: MaxPool2d(3, 2, 1), 2, 3, rng)
    _compare(lambda: AvgPool2d(3, 2, 1), 4, 3, rng)
    _compare(lambda: AvgPool2d(3, 1, 1, count_include_pad=False), 4, 3, rng)


def test_max_pool_reads_minus_inf_outside_and_zero_in_masked_neighbours():
    images = -torch.ones(1, 1, 64, 64, dtype=DT) - torch.rand(1, 1, 64, 64, dtype=DT)
    active = torch.tensor([[[True, False], [True, True]]])
    y = MaxPool2d(3, 2, 1)(_sparse(images, active, "torch")).to_dense()
    # top-left output pixel: window covers only in-image negative values (outside is -inf)
    assert y[0, 0, 0, 0] < -1
    # top row of patch (1, 1) reads input row 31, inside the masked patch (0, 1): 0 wins
    assert y[0, 0, 16, 20] == 0
    # the same row of patch (1, 0) reads the visible patch (0, 0) above: stays negative
    assert y[0, 0, 16, 4] < -1


def test_elementwise_ops_and_add(rng):
    images = torch.randn(2, 3, 64, 64, generator=rng, dtype=DT)
    active = torch.rand(2, 2, 2, generator=rng) < 0.5
    for backend in ("dense", "torch"):
        x = _sparse(images, active, backend)
        ref = images * PatchIndex(active).dense_mask(1, DT)
        assert torch.equal(ReLU()(x).to_dense(), ref.relu())
        assert torch.equal(ReLU6()(x).to_dense(), ref.clamp(0, 6))
        assert torch.allclose((x + x).to_dense(), 2 * ref)


def test_add_refuses_different_strides(rng):
    images = torch.randn(1, 3, 64, 64, dtype=DT)
    active = torch.ones(1, 2, 2, dtype=torch.bool)
    x = _sparse(images, active, "torch")
    with pytest.raises(ValueError, match="same batch index and stride"):
        x + MaxPool2d(3, 2, 1)(x)


def test_drop_path_scales_whole_images(rng):
    images = torch.randn(8, 2, 64, 64, generator=rng, dtype=DT)
    active = torch.ones(8, 2, 2, dtype=torch.bool)
    torch.manual_seed(0)
    dp = DropPath(0.5)
    y = dp(_sparse(images, active, "torch")).to_dense()
    per_image = (y / images).flatten(1)
    assert torch.allclose(per_image.min(1).values, per_image.max(1).values)
    assert set(per_image[:, 0].round().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_densify_fills_masked_positions_with_token(backend, rng):
    images = torch.randn(2, 3, 64, 96, generator=rng, dtype=DT)
    active = torch.rand(2, 2, 3, generator=rng) < 0.5
    token = torch.tensor([1.5, -2.0, 3.0], dtype=DT, requires_grad=True)
    x = _sparse(images, active, backend, stride=4)
    out = get_backend(backend).densify(x, token)
    mask = PatchIndex(active).dense_mask(4).expand_as(out)
    assert torch.equal(out[mask], x.to_dense()[mask])
    assert torch.equal(out[~mask], token.detach().view(1, 3, 1, 1).expand_as(out)[~mask])
    out.sum().backward()
    assert torch.equal(token.grad, (~mask).sum((0, 2, 3)).to(DT))


def test_geometry_that_breaks_the_patch_grid_is_refused(rng):
    images = torch.randn(1, 3, 64, 64, dtype=DT)
    active = torch.ones(1, 2, 2, dtype=torch.bool)
    for backend in ("dense", "torch"):
        with pytest.raises(ValueError, match="output size = input size / stride"):
            Conv2d(3, 3, 3, 1, 0)(_sparse(images, active, backend))
        with pytest.raises(ValueError, match="does not divide the patch side"):
            Conv2d(3, 3, 3, 2, 1)(_sparse(images, active, backend, stride=32))
