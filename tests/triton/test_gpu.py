"""GPU checks of the triton backend: bf16/fp16/fp32 against float64 at larger shapes, determinism.

Skipped without a CUDA GPU (the CPU interpreter tests cover the same kernels at tiny shapes).
"""
import copy

import pytest
import torch

from ctssl.models import create_resnet, resnet18_3d
from ctssl.sparse import random_patch_mask
from ctssl.sparse.backends.triton import TritonBackend
from ctssl.sparse.modules import BatchNorm2d, BatchNorm3d, Conv2d, Conv3d, MaxPool2d, MaxPool3d

from .util import compare_module, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k,s,pad,stride,cin,cout", [
    (7, 2, 3, 1, 3, 64), (3, 1, 1, 4, 64, 64), (3, 2, 1, 4, 128, 128), (1, 1, 0, 8, 256, 64),
    (1, 2, 0, 8, 256, 512), (3, 1, 1, 32, 512, 512), (3, 1, 1, 4, 67, 35),
])
def test_conv_gpu(k, s, pad, stride, cin, cout):
    compare_module(lambda: Conv2d(cin, cout, k, s, pad, bias=False), cin, stride, _gen(), dtypes=DTYPES,
                   size=(128, 160), batch=4, device="cuda")


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_and_pool_gpu(train):
    compare_module(lambda: BatchNorm2d(96), 96, 4, _gen(1), dtypes=DTYPES, size=(128, 128), batch=4,
                   train=train, device="cuda")
    compare_module(lambda: MaxPool2d(3, 2, 1), 64, 2, _gen(2), dtypes=DTYPES, size=(128, 128), batch=4,
                   device="cuda")


@pytest.mark.parametrize("k,s,pad,stride,cin,cout", [
    (7, 2, 3, 1, 1, 64), (3, 1, 1, 4, 64, 64), (3, 2, 1, 4, 128, 128), (1, 2, 0, 8, 128, 256), (3, 1, 1, 32, 256, 256),
])
def test_conv3d_gpu(k, s, pad, stride, cin, cout):
    masks = [random_patch_mask(2, (2, 2, 3), 0.5, generator=_gen(k))]
    compare_module(lambda: Conv3d(cin, cout, k, s, pad, bias=False), cin, stride, _gen(), dtypes=DTYPES,
                   size=(64, 64, 96), batch=2, masks=masks, device="cuda")


def test_batchnorm_and_pool_3d_gpu():
    masks = [random_patch_mask(2, (2, 2, 3), 0.5, generator=_gen(6))]
    compare_module(lambda: BatchNorm3d(64), 64, 4, _gen(1), dtypes=DTYPES, size=(64, 64, 96), batch=2, masks=masks,
                   device="cuda")
    compare_module(lambda: MaxPool3d(3, 2, 1), 64, 2, _gen(2), dtypes=DTYPES, size=(64, 64, 96), batch=2,
                   masks=masks, device="cuda")


def _resnet_step(model, images, active, backend, weights, autocast_dtype=None):
    m = copy.deepcopy(model)
    x = images.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        maps = m.forward_masked(x, active, backend)
        loss = sum((mp.float() * w.to(torch.float32)).sum() for mp, w in zip(maps, weights))
    loss.backward()
    out = [mp.detach().double() for mp in maps] + [x.grad.double()]
    out += [p.grad.double() for p in m.parameters()]
    out += [b.double() for b in m.buffers() if b.is_floating_point()]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resnet50_autocast_step_is_as_accurate_as_dense(dtype):
    torch.manual_seed(0)
    model = create_resnet("resnet50").cuda().train()
    images = torch.randn(16, 3, 224, 224, device="cuda")
    active = random_patch_mask(16, (7, 7), 0.6, generator=_gen(3)).cuda()
    weights = [torch.randn(16, c, 224 // s, 224 // s, device="cuda")
               for c, s in zip(model.feature_channels, model.feature_strides)]
    truth = _resnet_step(model.double(), images.double(), active, "dense", [w.double() for w in weights])
    model = model.float()
    dense = _resnet_step(model, images, active, "dense", weights, dtype)
    ours = _resnet_step(model, images, active, TritonBackend(), weights, dtype)
    e_dense = torch.tensor([rel_err(a, b) for a, b in zip(dense, truth)])
    e_ours = torch.tensor([rel_err(a, b) for a, b in zip(ours, truth)])
    assert e_ours[:4].max() <= 2 * e_dense[:4].max() + 1e-3, (e_ours[:4], e_dense[:4])
    assert e_ours.max() <= 3 * e_dense.max() + 1e-3, (e_ours.max(), e_dense.max())


def test_resnet50_fp32_and_tf32():
    torch.manual_seed(0)
    model = create_resnet("resnet50").cuda().train()
    images = torch.randn(4, 3, 128, 128, device="cuda")
    active = random_patch_mask(4, (4, 4), 0.6, generator=_gen(4)).cuda()
    weights = [torch.randn(4, c, 128 // s, 128 // s, device="cuda")
               for c, s in zip(model.feature_channels, model.feature_strides)]
    truth = _resnet_step(model.double(), images.double(), active, "dense", [w.double() for w in weights])
    model = model.float()
    dense = _resnet_step(model, images, active, "dense", weights)
    ours = _resnet_step(model, images, active, TritonBackend(), weights)
    e_dense = torch.tensor([rel_err(a, b) for a, b in zip(dense, truth)])
    e_ours = torch.tensor([rel_err(a, b) for a, b in zip(ours, truth)])
    assert e_ours.max() <= 3 * e_dense.max() + 1e-4, (e_ours.max(), e_dense.max())
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = _resnet_step(model, images, active, TritonBackend(), weights)
    assert max(rel_err(a, b) for a, b in zip(tf32[:4], truth[:4])) < 1e-2


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    torch.manual_seed(0)
    model = create_resnet("resnet50").cuda().train()
    images = torch.randn(8, 3, 224, 224, device="cuda")
    active = random_patch_mask(8, (7, 7), 0.6, generator=_gen(5)).cuda()
    weights = [torch.randn(8, c, 224 // s, 224 // s, device="cuda")
               for c, s in zip(model.feature_channels, model.feature_strides)]
    be = TritonBackend(deterministic=True)
    runs = [_resnet_step(model, images, active, be, weights, torch.bfloat16) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    fast = _resnet_step(model, images, active, TritonBackend(deterministic=False), weights, torch.bfloat16)
    assert max(rel_err(a, b) for a, b in zip(fast[:5], runs[0][:5])) < 5e-2


def test_resnet18_3d_step_is_as_accurate_as_dense():
    """The whole 3-D encoder (minutes in the interpreter, so on a GPU only), float32 and bf16 autocast."""
    torch.manual_seed(0)
    model = resnet18_3d().cuda().train()
    images = torch.randn(2, 1, 96, 96, 96, device="cuda")
    active = random_patch_mask(2, (3, 3, 3), 0.6, generator=_gen(7)).cuda()
    weights = [torch.randn(2, c, *([96 // s] * 3), device="cuda")
               for c, s in zip(model.feature_channels, model.feature_strides)]
    truth = _resnet_step(model.double(), images.double(), active, "dense", [w.double() for w in weights])
    model = model.float()
    for dtype in (None, torch.bfloat16):
        dense = _resnet_step(model, images, active, "dense", weights, dtype)
        ours = _resnet_step(model, images, active, TritonBackend(), weights, dtype)
        e_dense = torch.tensor([rel_err(a, b) for a, b in zip(dense, truth)])
        e_ours = torch.tensor([rel_err(a, b) for a, b in zip(ours, truth)])
        assert e_ours[:4].max() <= 2 * e_dense[:4].max() + 1e-3, (dtype, e_ours[:4], e_dense[:4])
        assert e_ours.max() <= 3 * e_dense.max() + 1e-3, (dtype, e_ours.max(), e_dense.max())
