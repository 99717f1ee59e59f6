"""Max pool and layout kernels (packing, to_dense, densify with its token) against the dense reference."""
import pytest
import torch
from torch import nn

from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.modules import MaxPool2d, ReLU

from .util import F64, compare_module, needs_triton, rel_err, sparse_at

pytestmark = needs_triton


@pytest.mark.parametrize("stride", [1, 16])
def test_max_pool_matches_dense(stride, rng):
    # stride 1 reads the (fp16-representable) images directly, so every dtype sees the same maxima
    dtypes = (torch.float32, torch.float16) if stride == 1 else (torch.float32,)
    compare_module(lambda: MaxPool2d(3, 2, 1), 5, stride, rng, dtypes=dtypes, batch=2)


def test_max_pool_after_relu_breaks_ties_like_torch(rng):
    """After a ReLU most windows tie at 0, across visible and masked pixels: the gradient goes where torch's does."""
    compare_module(lambda: nn.Sequential(ReLU(), MaxPool2d(3, 2, 1)), 3, 4, rng)


def test_max_pool_rejects_unaligned_geometry():
    x = sparse_at(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(ValueError, match="does not map a patch"):
        MaxPool2d(3, 2, 0)(x)


def test_pack_and_to_dense_round_trip_with_any_input_strides(rng):
    images = torch.randn(3, 5, 64, 96, generator=rng)
    active = torch.rand(3, 2, 3, generator=rng) < 0.5
    active[0] = False
    mask = PatchIndex(active).dense_mask(1, images.dtype)
    for x in (images, images.to(memory_format=torch.channels_last), images[:, :, :, :]):
        dense = sparse_at(x, active, "triton").to_dense()
        assert dense.is_contiguous(memory_format=torch.channels_last)  # the rows' order, like the cuda backend
        assert torch.equal(dense, images * mask)


def test_image_gradient_is_laid_out_like_the_images(rng):
    images = torch.randn(2, 3, 64, 64, generator=rng)
    active = torch.tensor([[[True, False], [False, True]], [[True, True], [False, True]]])

    def image_grad(x, backend):
        x = x.clone().requires_grad_(True)
        rows = sparse_at(x, active, backend).values
        (rows * torch.arange(rows.numel(), dtype=rows.dtype).view_as(rows)).sum().backward()
        return x.grad

    expected = image_grad(images, "torch")
    assert expected.abs().sum() > 0
    for x, fmt in ((images, torch.contiguous_format), (images.to(memory_format=torch.channels_last),
                                                       torch.channels_last)):
        grad = image_grad(x, "triton")
        assert grad.is_contiguous(memory_format=fmt)
        assert torch.equal(grad, expected)


def test_sparse_input_packs_like_torch_backend(rng):
    images = torch.randn(2, 3, 64, 64, generator=rng)
    active = torch.tensor([[[True, False], [False, True]], [[True, True], [False, True]]])
    ours = sparse_at(images, active, "triton").values
    ref = sparse_at(images, active, "torch").values
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_densify_fills_tokens_and_back_propagates(dtype, rng):
    images = torch.randn(3, 4, 64, 96, generator=rng, dtype=F64)
    active = torch.rand(3, 2, 3, generator=rng) < 0.5
    active[1] = True
    token = torch.randn(4, generator=rng, dtype=F64)
    weight = torch.randn(3, 4, 16, 24, generator=rng, dtype=F64)
    outs = {}
    for backend, dt in (("dense", F64), ("triton", dtype)):
        x = images.to(dt).detach().requires_grad_(True)
        tok = token.clone().requires_grad_(True)  # the token stays float64/float32 like a parameter
        s = sparse_at(x, active, backend, stride=4)
        y = get_backend(backend).densify(s, tok)
        (y * weight.to(y.dtype)).sum().backward()
        outs[backend] = (y.detach(), x.grad, tok.grad)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(outs["triton"], outs["dense"]):
        assert rel_err(a, b) < tol
    assert outs["triton"][2].dtype == F64 and outs["triton"][2].shape == token.shape


def test_densify_rejects_a_token_of_the_wrong_size():
    x = sparse_at(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(ValueError, match="token has 4 entries, expected one per channel"):
        get_backend("triton").densify(x, torch.zeros(4))
