"""minkowski backend: against the dense reference where MinkowskiEngine imports (never in CI)."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from ctssl.models import resnet18
from ctssl.sparse import get_backend
from ctssl.sparse.backends.minkowski import MinkowskiBackend

from .spconv_test_utils import masks, pair_at_stride

ME_MISSING = MinkowskiBackend().unavailable_reason() is not None
needs_me = pytest.mark.skipif(ME_MISSING, reason="MinkowskiEngine not installed (source only; see the backend's "
                                                 "unavailable_reason for the build steps)")
GRID = (3, 2)
MASKS = masks(3, GRID, seed=11)
LAYERS = [("stem_7x7_s2", 1, 7, 2, 3), ("3x3_s1", 4, 3, 1, 1), ("3x3_s1_p2", 16, 3, 1, 1), ("3x3_s2", 4, 3, 2, 1),
          ("1x1_s2", 8, 1, 2, 0), ("2x2_s2", 8, 2, 2, 0), ("maxpool_3x3_s2", 2, 3, 2, 1)]


def test_unavailable_reason_explains_the_build(monkeypatch):
    import ctssl.sparse.backends.minkowski as mod

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(mod, "importlib", types.SimpleNamespace(import_module=missing))
    reason = MinkowskiBackend().unavailable_reason()
    for phrase in ("no wheels", "source only", "unmaintained", "--blas=openblas --cpu_only", "libopenblas-dev",
                   "collections.abc import Sequence", "MinkowskiEngine==0.5.4"):
        assert phrase in reason


@needs_me
@pytest.mark.parametrize("mask", ["random", "one_image_empty", "corners", "none_visible"])
@pytest.mark.parametrize("name,fstride,k,s,pad", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_layer_forward_backward(mask, name, fstride, k, s, pad):
    dense, mk = get_backend("dense"), get_backend("minkowski")
    active = MASKS[mask]
    g = torch.Generator().manual_seed(0)
    p = 32 // fstride
    x = torch.randn(3, 4, GRID[0] * p, GRID[1] * p, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    xd, xs = pair_at_stride(x, active, fstride, dense, mk)
    xd.values.requires_grad_()
    xs.values.requires_grad_()
    wd, ws = w.clone().requires_grad_(), w.clone().requires_grad_()
    if name.startswith("maxpool"):
        yd, ys = dense.max_pool2d(xd, k, s, pad), mk.max_pool2d(xs, k, s, pad)
    else:
        yd, ys = dense.conv2d(xd, wd, bias, s, pad, 1, 1), mk.conv2d(xs, ws, bias, s, pad, 1, 1)
    assert ys.stride == yd.stride
    torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-10, atol=1e-10)
    if active.sum() == 0:
        return
    upstream = torch.randn(yd.values.shape, generator=g, dtype=torch.float64)
    (yd.values * upstream).sum().backward()
    (ys.to_dense() * upstream).sum().backward()
    grad_s = xs.with_values(xs.values.grad).to_dense()
    torch.testing.assert_close(grad_s, xd.values.grad * xd.index.dense_mask(fstride, torch.float64),
                               rtol=1e-10, atol=1e-10)
    if not name.startswith("maxpool"):
        torch.testing.assert_close(ws.grad, wd.grad, rtol=1e-10, atol=1e-10)


@needs_me
@pytest.mark.parametrize("mask", ["random", "one_image_empty"])
def test_resnet18_forward_backward_matches_dense(mask):
    torch.manual_seed(0)
    model = resnet18(in_chans=1).double().train()
    images = torch.randn(3, 1, 96, 64, dtype=torch.float64)
    active = MASKS[mask]
    results = []
    for backend in ("dense", "minkowski"):
        m = copy.deepcopy(model)
        x = images.clone().requires_grad_()
        maps = m.forward_masked(x, active, backend)
        upstream = [torch.randn(mp.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                    for i, mp in enumerate(maps)]
        sum((mp * u).sum() for mp, u in zip(maps, upstream)).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append(([mp.detach() for mp in maps], x.grad, grads, dict(m.named_buffers())))
    (maps_d, xg_d, g_d, b_d), (maps_m, xg_m, g_m, b_m) = results
    for a, b in zip(maps_m, maps_d):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(xg_m, xg_d, rtol=1e-8, atol=1e-8)
    assert g_m.keys() == g_d.keys()
    for n in g_d:
        torch.testing.assert_close(g_m[n], g_d[n], rtol=1e-8, atol=1e-8, msg=n)
    for n in b_d:
        torch.testing.assert_close(b_m[n], b_d[n], rtol=1e-8, atol=1e-8, msg=n)
