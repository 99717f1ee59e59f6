"""The torch backend's conv paths (matmul on rows, one GEMM on unfolded taps for tiny patches, the framework
conv on halo-padded patches) against dense, and what they keep for the backward: the rows, not the padded
patches (which hold up to (P/p)**d times as much)."""
import pytest
import torch
import torch.nn.functional as F

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.backends.torch_packed import GEMM_MAX_SIDE

from .helpers import rel_err, sparse_at

F64 = torch.float64
PATCH = 8


def _data(rng, dims=3, channels=4):
    grid = (2, 3, 2)[:dims] if dims == 3 else (2, 3)
    images = torch.randn(2, channels, *(g * PATCH for g in grid), generator=rng, dtype=F64)
    active = torch.rand(2, *grid, generator=rng) < 0.6
    active[0].view(-1)[0] = True
    return images, active


def _conv_both(images, active, stride, weight, conv_stride, padding, dilation, groups=1):
    outs = {}
    for name in ("dense", "torch"):
        x = images.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        s = sparse_at(x, active, name, stride, PATCH)
        y = getattr(get_backend(name), f"conv{s.ndim}d")(s, w, None, conv_stride, padding, dilation, groups)
        dense = y.to_dense()
        (dense * torch.randn(dense.shape, generator=torch.Generator().manual_seed(3), dtype=F64)).sum().backward()
        outs[name] = (dense.detach(), x.grad, w.grad)
    for a, b in zip(outs["torch"], outs["dense"]):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride", [1, 4, 8])  # patch sides 8 (framework conv), 2 and 1 (GEMM on unfolded taps)
def test_dilated_and_strided_convs_match_dense_on_every_path(dims, stride, rng):
    images, active = _data(rng, dims)
    k = (3,) * dims
    _conv_both(images, active, stride, torch.randn(5, 4, *k, generator=rng, dtype=F64), 1, 2, 2)
    _conv_both(images, active, stride, torch.randn(5, 4, *k, generator=rng, dtype=F64), 2 if stride < 8 else 1, 1, 1)
    _conv_both(images, active, stride, torch.randn(4, 2, *k, generator=rng, dtype=F64), 1, 1, 1, groups=2)


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_conv_and_max_pool_keep_rows_not_halo_padded_patches(rng):
    images, active = _data(rng, 3, channels=4)
    x = sparse_at(images.requires_grad_(True), active, "torch", 2, PATCH)  # 4-voxel patches
    be = get_backend("torch")
    n = x.index.num_patches
    w = torch.randn(4, 4, 3, 3, 3, dtype=F64, requires_grad=True)
    conv = _saved_shapes(lambda: be.conv3d(x, w, None, 1, 1, 1, 1))
    pool = _saved_shapes(lambda: be.max_pool3d(x, 3, 2, 1))
    padded = (n, 6, 6, 6, 4)
    assert x.values.shape in conv and all(s not in (padded, (n, 4, 6, 6, 6)) for s in conv + pool)
    assert all(len(s) == 2 for s in pool)  # the rows (to recompute from); no indices into a padded copy


def test_tiny_patches_run_as_one_gemm():
    assert GEMM_MAX_SIDE >= 1
    active = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    x = sparse_at(torch.randn(1, 3, 8, 8, 16), active, "torch", 8, PATCH)  # 1-voxel patches
    w = torch.randn(5, 3, 3, 3, 3, requires_grad=True)
    ops = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            ops.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        y = get_backend("torch").conv3d(x, w, None, 1, 1, 1, 1)
    assert "linear" in ops and "conv3d" not in ops
    dense = F.conv3d(x.to_dense(), w, None, 1, 1) * PatchIndex(active, PATCH).dense_mask(8)
    assert torch.allclose(y.to_dense(), dense, atol=1e-5)


def test_halo_conv_under_cpu_autocast_returns_input_dtype_gradients(rng):
    images, active = _data(rng, 3)
    images = images.float()
    w = torch.randn(6, 4, 3, 3, 3, generator=rng)
    grads = {}
    for name in ("dense", "torch"):
        x, wt = images.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = get_backend(name).conv3d(sparse_at(x, active, name, 1, PATCH), wt, None, 1, 1, 1, 1).to_dense()
            assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32 and wt.grad.dtype == torch.float32
        grads[name] = (x.grad, wt.grad)
    for a, b in zip(grads["torch"], grads["dense"]):
        assert rel_err(a, b) < 3e-2
