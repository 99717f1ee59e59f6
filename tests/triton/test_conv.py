"""Sparse conv kernels (forward, input and weight gradient) against the dense float64 reference."""
import pytest
import torch

from ctssl.sparse.modules import Conv2d

from .util import compare_module, needs_triton, sparse_at

pytestmark = needs_triton


@pytest.mark.parametrize("k,s,pad,stride,cin,cout", [
    (7, 2, 3, 1, 3, 5),    # the stem, 3 channels (flat K: taps x channels in one axis)
    (7, 2, 3, 1, 1, 17),   # the stem, 1 channel
    (3, 1, 1, 4, 5, 17),   # 3x3 stride 1
    (3, 2, 1, 8, 17, 5),   # 3x3 stride 2: four parity classes in the input gradient
    (3, 1, 1, 32, 17, 3),  # 1-pixel patches: every tap but the centre reads a neighbour
    (1, 1, 0, 4, 17, 5),   # 1x1
    (1, 2, 0, 16, 5, 17),  # 1x1 stride 2: three classes without taps get zero gradient
    (5, 1, 2, 2, 3, 5),
])
def test_conv_matches_dense(k, s, pad, stride, cin, cout, rng):
    dtypes = (torch.float32, torch.float16) if k in (3, 7) and cin != 1 else (torch.float32,)
    compare_module(lambda: Conv2d(cin, cout, k, s, pad, bias=True), cin, stride, rng, dtypes=dtypes)


def test_dilated_and_rectangular_conv_matches_dense(rng):
    compare_module(lambda: Conv2d(3, 4, 3, 1, 2, dilation=2, bias=False), 3, 4, rng)
    compare_module(lambda: Conv2d(3, 4, (3, 1), 1, (1, 0)), 3, 8, rng)


def test_no_visible_patch_at_all(rng):
    empty = torch.zeros(2, 2, 3, dtype=torch.bool)
    compare_module(lambda: Conv2d(3, 5, 3, 2, 1), 3, 4, rng, batch=2, masks=[empty])


def test_grouped_conv_is_refused_naming_the_backend():
    x = sparse_at(torch.randn(1, 4, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(NotImplementedError, match="triton.*groups=2"):
        Conv2d(4, 4, 3, 1, 1, groups=2)(x)


def test_bad_inputs_give_clear_errors():
    x = sparse_at(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(TypeError, match="triton.*float32.*float64"):
        Conv2d(3, 4, 3, 1, 1).double()(x)
    x64 = x.with_values(x.values.double())
    with pytest.raises(TypeError, match="float64"):
        Conv2d(3, 4, 3, 1, 1).double()(x64)
    with pytest.raises(ValueError, match="does not map a patch"):
        Conv2d(3, 4, 3, 1, 0)(x)
