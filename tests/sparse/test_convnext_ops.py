"""ConvNeXt's engine ops (LayerNorm, Linear, GELU, layer scale, depthwise conv) and their modules:
torch backend == dense reference in float64, forward and backward, on images and volumes; and
the op-capability check that refuses a model a backend cannot run."""
import pytest
import torch
import torch.nn.functional as F

from ctssl.sparse import BackendUnavailableError, get_backend, sparse_input
from ctssl.sparse.backends import Backend
from ctssl.sparse.backends.base import CONVNEXT_OPS, RESNET_OPS
from ctssl.sparse.functional import scale_channels, to_channels_first, to_channels_last
from ctssl.sparse.modules import GELU, LayerNorm, LayerNorm2d, Linear

from .test_nd_index import PATCH, _compare_op, _masks

DT = torch.float64
GRIDS = [((3, 4), 1), ((3, 4), 4), ((3, 4), 8), ((2, 2, 3), 2), ((2, 2, 2), 8)]  # (patch grid, feature stride)


def _images(grid, channels, rng):
    return torch.randn(2, channels, *(g * PATCH for g in grid), generator=rng, dtype=DT)


def _all_masks(grid, rng):
    """Random, one sample without a visible patch, a single patch, and nothing visible at all."""
    return _masks(2, grid, rng) + [torch.zeros(2, *grid, dtype=torch.bool)]


@pytest.mark.parametrize("grid,stride", GRIDS)
def test_layer_norm_matches_dense(grid, stride, rng):
    images = _images(grid, 5, rng) * 3 + 1
    for active in _all_masks(grid, rng):
        _compare_op(lambda be, s, w, b: be.layer_norm(s, w, b, 1e-6), images, active, 5, stride, (5,))


@pytest.mark.parametrize("grid,stride", GRIDS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense_and_keeps_masked_zero(grid, stride, bias, rng):
    images = _images(grid, 4, rng)
    for active in _all_masks(grid, rng):
        _compare_op(lambda be, s, w, *b: be.linear(s, w, b[0] if b else None), images, active, 4, stride, (6, 4),
                    bias=bias)


@pytest.mark.parametrize("grid,stride", GRIDS[:2] + GRIDS[3:4])
def test_gelu_and_layer_scale_match_dense(grid, stride, rng):
    images = _images(grid, 3, rng)
    for active in _masks(2, grid, rng):
        _compare_op(lambda be, s: be.gelu(s), images, active, 3, stride)
        _compare_op(lambda be, s: be.gelu(s, "tanh"), images, active, 3, stride)
        _compare_op(lambda be, s, g: be.scale_channels(s, g), images, active, 3, stride, (3,), bias=False)


@pytest.mark.parametrize("k,stride", [(3, 2), (7, 4), (7, 8)])
def test_depthwise_conv3d_matches_dense(k, stride, rng):
    """The depthwise conv is dimension-agnostic: a k^3 depthwise conv on volumes, up to 3 patches away."""
    images = _images((2, 2, 3), 3, rng)
    for active in _masks(2, (2, 2, 3), rng):
        _compare_op(lambda be, s, w, b: be.conv3d(s, w, b, 1, k // 2, 1, 3), images, active, 3, stride,
                    (3, 1, k, k, k))


def test_modules_are_torch_and_timm_modules_on_dense_input(rng):
    pytest.importorskip("timm")
    from timm.layers import LayerNorm2d as TimmLayerNorm2d

    x = torch.randn(2, 6, 5, 7, generator=rng, dtype=DT)
    ln2d, theirs = LayerNorm2d(6, eps=1e-6).double(), TimmLayerNorm2d(6, eps=1e-6).double()
    with torch.no_grad():
        ln2d.weight.uniform_(0.5, 1.5)
        ln2d.bias.uniform_(-1, 1)
    theirs.load_state_dict(ln2d.state_dict())
    assert list(ln2d.state_dict()) == ["weight", "bias"]
    assert torch.allclose(ln2d(x), theirs(x))
    vol = torch.randn(2, 6, 3, 4, 5, generator=rng, dtype=DT)  # channels-first volumes too
    mean, var = vol.mean(1, keepdim=True), vol.var(1, unbiased=False, keepdim=True)
    want = (vol - mean) / (var + 1e-6).sqrt() * ln2d.weight.view(1, 6, 1, 1, 1) + ln2d.bias.view(1, 6, 1, 1, 1)
    assert torch.allclose(ln2d(vol), want)
    ln = LayerNorm(6, eps=1e-6).double()
    ln.load_state_dict(ln2d.state_dict())
    assert torch.allclose(to_channels_first(ln(to_channels_last(x))), ln2d(x))
    lin = Linear(6, 3).double()
    assert torch.equal(lin(to_channels_last(x)), F.linear(x.movedim(1, -1), lin.weight, lin.bias))
    assert torch.equal(GELU()(x), F.gelu(x))
    gamma = torch.randn(6, dtype=DT, generator=rng)
    assert torch.equal(scale_channels(to_channels_last(x), gamma), x.movedim(1, -1) * gamma)


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_modules_run_the_backend_ops_on_sparse_maps(backend, rng):
    images = _images((2, 3), 6, rng)
    active = _masks(2, (2, 3), rng)[1]
    x = sparse_input(images, active, backend, patch_size=PATCH)
    ln2d, lin, act = LayerNorm2d(6).double(), Linear(6, 4).double(), GELU(approximate="tanh")
    be = get_backend(backend)
    assert torch.equal(ln2d(x).to_dense(), be.layer_norm(x, ln2d.weight, ln2d.bias, ln2d.eps).to_dense())
    assert torch.equal(lin(x).to_dense(), be.linear(x, lin.weight, lin.bias).to_dense())
    assert torch.equal(act(x).to_dense(), be.gelu(x, "tanh").to_dense())
    assert to_channels_last(x) is x and to_channels_first(x) is x
    with pytest.raises(ValueError, match="LayerNorm2d: normalizes over \\(5,\\), the map has 6 channels"):
        LayerNorm2d(5)(x)
    with pytest.raises(ValueError, match="Linear: expected 5 input channels, got 6"):
        Linear(5, 2)(x)


def test_backend_without_an_op_refuses_the_model_at_selection(rng):
    class ResNetOnly(Backend):
        name = "resnet-only"
        unsupported_ops_reason = "it was written for ResNets"

    images, active = _images((1, 1), 3, rng), torch.ones(2, 1, 1, dtype=torch.bool)
    expected = ("backend 'resnet-only' cannot run ConvNeXt: it has no depthwise_conv, "
                "gelu, layer_norm, linear, scale_channels op \\(it was written for ResNets\\)")
    with pytest.raises(ValueError, match=expected):
        sparse_input(images, active, ResNetOnly(), patch_size=PATCH, ops=CONVNEXT_OPS, model="ConvNeXt")
    ResNetOnly().check_ops(RESNET_OPS)
    with pytest.raises(ValueError, match="unknown sparse ops conv7"):
        get_backend("torch").check_ops({"conv7"})
    assert get_backend("auto", "cpu", ops=CONVNEXT_OPS).name == "torch"
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        get_backend("nope", ops=CONVNEXT_OPS)
