"""spconv backend on a CUDA GPU: forward and backward against dense, fp32 and fp16.

Runs once for every spconv that can serve the GPU: the real spconv (a CUDA build,
spconv-cu12x) and spconv-triton. Prepared for the GPU machine (``gpu_check.sh``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from ctssl.models import resnet18, resnet18_3d
from ctssl.sparse import get_backend
from ctssl.sparse.backends.spconv import SpconvBackend, _spconv_has_gpu

from .spconv_test_utils import masks, pair_at_stride

NO_GPU = ("needs a CUDA GPU: spconv's backward runs only on CUDA (its CPU build is forward only), so this is the "
          "only place spconv's backward is tested, and it is untested on this machine")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


def _impls():
    if not torch.cuda.is_available():
        return [pytest.param(impl, marks=pytest.mark.skip(reason=NO_GPU)) for impl in ("spconv", "spconv_triton")]
    params = []
    for impl in ("spconv", "spconv_triton"):
        backend = SpconvBackend(impl)
        reason = backend.unavailable_reason()
        if reason is None and impl == "spconv" and not _spconv_has_gpu():
            reason = "the installed spconv is its CPU-only build"
        params.append(pytest.param(impl, marks=pytest.mark.skipif(reason is not None, reason=f"{impl}: {reason}")))
    return params


@pytest.fixture(params=_impls())
def sp(request):
    return SpconvBackend(request.param)


@pytest.fixture(autouse=True)
def exact_dense():
    """The reference must not run in TF32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


LAYERS = [("stem_7x7_s2", 1, 7, 2, 3), ("3x3_s1", 4, 3, 1, 1), ("3x3_s2", 4, 3, 2, 1), ("3x3_s1_p2", 16, 3, 1, 1),
          ("1x1_s2", 8, 1, 2, 0), ("maxpool_3x3_s2", 2, 3, 2, 1)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask", ["random", "one_image_empty", "corners"])
@pytest.mark.parametrize("name,fstride,k,s,pad", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_layer_forward_backward(sp, dtype, tol, mask, name, fstride, k, s, pad):
    dense = get_backend("dense")
    active = masks(4, (3, 4), seed=5)[mask].cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    p = 32 // fstride
    x = torch.randn(4, 16, 3 * p, 4 * p, device="cuda", generator=g).to(dtype)
    w = (torch.randn(32, 16, k, k, device="cuda", generator=g) / (4 * k)).to(dtype)
    xd, xs = pair_at_stride(x, active, fstride, dense, sp)
    xd.values.requires_grad_()
    xs.values.requires_grad_()
    wd, ws = w.clone().requires_grad_(), w.clone().requires_grad_()
    if name.startswith("maxpool"):
        yd, ys = dense.max_pool2d(xd, k, s, pad), sp.max_pool2d(xs, k, s, pad)
    else:
        yd, ys = dense.conv2d(xd, wd, None, s, pad, 1, 1), sp.conv2d(xs, ws, None, s, pad, 1, 1)
    out_d, out_s = yd.values, ys.to_dense()
    assert rel(out_s, out_d) < tol
    upstream = torch.randn(out_d.shape, device="cuda", generator=g).to(dtype) * yd.index.dense_mask(yd.stride, dtype)
    (out_d * upstream).float().sum().backward()
    (out_s * upstream).float().sum().backward()
    grad_s = xs.with_values(xs.values.grad).to_dense()
    assert rel(grad_s, xd.values.grad * xd.index.dense_mask(fstride, dtype)) < tol
    if not name.startswith("maxpool"):
        assert rel(ws.grad, wd.grad) < tol


def test_bf16_warns_and_matches(sp):
    dense = get_backend("dense")
    active = masks(2, (2, 2))["random"].cuda()
    x = torch.randn(2, 8, 16, 16, device="cuda").bfloat16()
    w = torch.randn(8, 8, 3, 3, device="cuda").bfloat16()
    xd, xs = pair_at_stride(x.float(), active, 2, dense, sp)
    xs = xs.with_values(xs.values.bfloat16())
    with pytest.warns(UserWarning, match="no bf16 kernels"):
        ys = sp.conv2d(xs, w, None, 1, 1, 1, 1)
    assert ys.dtype == torch.bfloat16
    assert rel(ys.to_dense(), dense.conv2d(xd, w.float(), None, 1, 1, 1, 1).values) < 2e-2


def _encoder_runs_match(model, images, active, sp):
    """forward_masked + backward on dense and on ``sp``: maps, image and parameter gradients, BN buffers agree."""
    results = []
    for backend in ("dense", sp):
        m = copy.deepcopy(model)
        x = images.clone().requires_grad_()
        maps = m.forward_masked(x, active, backend)
        torch.manual_seed(1)
        sum((mp * torch.randn_like(mp)).sum() for mp in maps).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((maps, x.grad, grads, dict(m.named_buffers())))
    (maps_d, xg_d, g_d, b_d), (maps_s, xg_s, g_s, b_s) = results
    for a, b in zip(maps_s, maps_d):
        assert rel(a, b) < 1e-4
    assert rel(xg_s, xg_d) < 1e-4
    assert g_s.keys() == g_d.keys()
    for n in g_d:
        assert rel(g_s[n], g_d[n]) < 1e-3, n
    for n in b_d:
        if b_d[n].is_floating_point():
            assert rel(b_s[n], b_d[n]) < 1e-4, n


def test_resnet18_forward_backward_matches_dense(sp):
    torch.manual_seed(0)
    model = resnet18(in_chans=1).cuda().train()
    images = torch.randn(4, 1, 96, 128, device="cuda")
    for mask in ("random", "one_image_empty"):
        _encoder_runs_match(model, images, masks(4, (3, 4), seed=7)[mask].cuda(), sp)


def test_resnet18_3d_forward_backward_matches_dense(sp):
    """Volumes through SubMConv3d / SparseConv3d / SparseMaxPool3d, forward and backward."""
    torch.manual_seed(0)
    model = resnet18_3d().cuda().train()
    images = torch.randn(2, 1, 64, 64, 96, device="cuda")
    active = torch.rand(2, 2, 2, 3, generator=torch.Generator().manual_seed(8)) < 0.5
    active[0] = False
    active[1, 0, 0, 0] = True
    _encoder_runs_match(model, images, active.cuda(), sp)
