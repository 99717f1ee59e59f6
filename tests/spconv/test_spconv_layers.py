"""spconv backend on CPU: single layers against the dense reference (forward only, spconv's CPU build)."""
from __future__ import annotations

import pytest
import torch

from ctssl.sparse import get_backend
from ctssl.sparse.backends.spconv import SPCONV_CPU_NO_BACKWARD, SpconvBackend

from .spconv_test_utils import masks, pair_at_stride

pytestmark = pytest.mark.skipif(SpconvBackend("spconv").unavailable_reason() is not None,
                                reason="spconv not installed")

GRID = (3, 2)
MASKS = masks(3, GRID)
# (name, feature stride, kernel, stride, padding, dilation): ResNet's layers and a few more
CONVS = [
    ("stem_7x7_s2", 1, 7, 2, 3, 1),
    ("3x3_s1", 4, 3, 1, 1, 1),
    ("3x3_s1_p1", 16, 3, 1, 1, 1),  # patch side 2: every tap of the ring is a neighbour's
    ("3x3_s2", 4, 3, 2, 1, 1),
    ("3x3_s2_to_p1", 16, 3, 2, 1, 1),
    ("1x1_s1", 8, 1, 1, 0, 1),
    ("1x1_s2", 8, 1, 2, 0, 1),
    ("3x3_dilated", 4, 3, 1, 2, 2),
    ("2x2_s2", 8, 2, 2, 0, 1),
]


@pytest.fixture(scope="module")
def backends():
    return get_backend("dense"), get_backend("spconv")


def _input(active, stride, channels, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = 32 // stride
    B, h, w = active.shape
    return torch.randn(B, channels, h * p, w * p, generator=g, dtype=dtype)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name,fstride,k,s,pad,dil", CONVS, ids=[c[0] for c in CONVS])
def test_conv_matches_dense(backends, mask, name, fstride, k, s, pad, dil):
    dense, sp = backends
    active = MASKS[mask]
    x = _input(active, fstride, 5)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    xd, xs = pair_at_stride(x, active, fstride, dense, sp)
    for bias in (None, b):
        yd = dense.conv2d(xd, w, bias, s, pad, dil, 1)
        ys = sp.conv2d(xs, w, bias, s, pad, dil, 1)
        assert ys.stride == yd.stride == fstride * s
        assert ys.values.shape == (active.sum().item() * ys.patch_side ** 2, 6)
        torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-10, atol=1e-10)


def test_conv_float32_and_grouped_fallback(backends):
    dense, sp = backends
    active = MASKS["random"]
    x = _input(active, 4, 4, torch.float32)
    xd, xs = pair_at_stride(x, active, 4, dense, sp)
    w = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(sp.conv2d(xs, w, None, 1, 1, 1, 1).to_dense(),
                               dense.conv2d(xd, w, None, 1, 1, 1, 1).values, rtol=1e-4, atol=1e-4)
    wg = torch.randn(8, 2, 3, 3)  # groups=2: spconv has no groups, the inherited halo path runs
    torch.testing.assert_close(sp.conv2d(xs, wg, None, 2, 1, 1, 2).to_dense(),
                               dense.conv2d(xd, wg, None, 2, 1, 1, 2).values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("fstride", [2, 8])
def test_maxpool_matches_dense(backends, mask, fstride):
    """Negative inputs on purpose: spconv's pool alone returns max(0, max over active), SparK's does not."""
    dense, sp = backends
    active = MASKS[mask]
    x = _input(active, fstride, 3) - 1.0
    xd, xs = pair_at_stride(x, active, fstride, dense, sp)
    yd, ys = dense.max_pool2d(xd, 3, 2, 1), sp.max_pool2d(xs, 3, 2, 1)
    assert ys.stride == 2 * fstride
    torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-12, atol=1e-12)
    # after a ReLU (the ResNet stem) no shift is needed and the result is exact
    xd, xs = xd.map(torch.relu), xs.map(torch.relu)
    torch.testing.assert_close(sp.max_pool2d(xs, 3, 2, 1).to_dense(), dense.max_pool2d(xd, 3, 2, 1).values,
                               rtol=0, atol=0)


def test_avgpool_matches_dense(backends):
    dense, sp = backends
    active = MASKS["random"]
    x = _input(active, 4, 3)
    xd, xs = pair_at_stride(x, active, 4, dense, sp)
    for include in (True, False):
        torch.testing.assert_close(sp.avg_pool2d(xs, 3, 2, 1, include).to_dense(),
                                   dense.avg_pool2d(xd, 3, 2, 1, include).values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_dense(backends, training):
    dense, sp = backends
    active = MASKS["one_image_empty"]
    x = _input(active, 8, 4) * 3 + 1
    xd, xs = pair_at_stride(x, active, 8, dense, sp)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    stats = [(torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5) for _ in range(2)]
    stats[1] = (stats[0][0].clone(), stats[0][1].clone())
    yd = dense.batch_norm(xd, weight, bias, *stats[0], training, 0.1, 1e-5)
    ys = sp.batch_norm(xs, weight, bias, *stats[1], training, 0.1, 1e-5)
    torch.testing.assert_close(ys.to_dense(), yd.values, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-12, atol=1e-12)


def test_bf16_computed_in_float32_with_warning(backends):
    dense, _ = backends
    sp = SpconvBackend()  # a fresh instance: the warning is given once per backend
    active = MASKS["random"]
    x = _input(active, 4, 4, torch.bfloat16)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    xd, xs = pair_at_stride(x.float(), active, 4, dense, sp)
    xs = xs.with_values(xs.values.to(torch.bfloat16))
    with pytest.warns(UserWarning, match="no bf16 kernels"):
        ys = sp.conv2d(xs, w, None, 2, 1, 1, 1)
    assert ys.dtype == torch.bfloat16
    yd = dense.conv2d(xd, w.float(), None, 2, 1, 1, 1)
    torch.testing.assert_close(ys.to_dense().float(), yd.values, rtol=1e-2, atol=1e-2)


def test_cpu_backward_raises_clear_error(backends):
    dense, sp = backends
    active = MASKS["random"]
    x = _input(active, 4, 3).requires_grad_()
    _, xs = pair_at_stride(x, active, 4, dense, sp)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = sp.conv2d(xs, w, None, 1, 1, 1, 1)  # the forward itself works
    with pytest.raises(RuntimeError, match="spconv's CPU build has no backward") as info:
        y.values.sum().backward()
    assert str(info.value) == SPCONV_CPU_NO_BACKWARD
    with pytest.raises(RuntimeError, match="spconv's CPU build has no backward"):
        sp.max_pool2d(xs, 3, 2, 1).values.sum().backward()


def test_thread_count_restored_and_pairs_cached(backends):
    dense, sp = backends
    active = MASKS["random"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _input(active, 4, 3)
        xd, xs = pair_at_stride(x, active, 4, dense, sp)
        w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        y1 = sp.conv2d(xs, w, None, 1, 1, 1, 1)
        assert torch.get_num_threads() == 2
        pairs = [v for k, v in xs.index.backend_cache("spconv").items() if k[0] == "pairs"]
        assert len(pairs) == 1 and len(pairs[0]) == 1  # the SubM pairs of this stride, built once
        y2 = sp.conv2d(xs, w * 2, None, 1, 1, 1, 1)  # reuses them
        torch.testing.assert_close(y2.values, 2 * y1.values)
        indices = xs.index.backend_cache("spconv")[("pixels", 4)][0]
        assert indices.dtype == torch.int32 and indices.is_contiguous()
    finally:
        torch.set_num_threads(before)


def test_unavailable_reason_and_device_errors(monkeypatch):
    import ctssl.sparse.backends.spconv as mod
    from ctssl.sparse import BackendUnavailableError

    monkeypatch.setitem(mod.IMPLEMENTATIONS, "spconv", "ctssl_no_such_spconv.pytorch")
    monkeypatch.setitem(mod.IMPLEMENTATIONS, "spconv_triton", "ctssl_no_such_spconv_triton.pytorch")
    reason = SpconvBackend().unavailable_reason()
    assert "spconv is not installed" in reason and "pip install spconv==2.3.8 cumm==0.7.11" in reason
    with pytest.raises(BackendUnavailableError, match="spconv-triton is GPU only"):
        SpconvBackend(impl="spconv_triton").check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="impl must be one of"):
        SpconvBackend(impl="spconv3")
