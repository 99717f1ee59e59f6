"""spconv backend on CPU: the ResNet-18 encoder against the dense reference (tiny shapes, float64)."""
from __future__ import annotations

import copy

import pytest
import torch

from ctssl.models import resnet18
from ctssl.sparse.backends.spconv import SpconvBackend

from .spconv_test_utils import masks

pytestmark = pytest.mark.skipif(SpconvBackend("spconv").unavailable_reason() is not None,
                                reason="spconv not installed")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 maps: thread start-up dominates on a shared 2-core machine (spconv runs on one anyway)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = resnet18(in_chans=2).double()
    with torch.no_grad():  # non-trivial BN affine and running statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m


MASKS = masks(2, (2, 3), seed=3)


@pytest.mark.parametrize("mask", ["random", "one_image_empty", "corners", "all_visible"])
@pytest.mark.parametrize("training", [True, False])
def test_resnet18_forward_matches_dense(model, mask, training):
    active = MASKS[mask]
    images = torch.randn(2, 2, 64, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, out = copy.deepcopy(model).train(training), copy.deepcopy(model).train(training)
    with torch.no_grad():
        maps_d = ref.forward_masked(images, active, "dense")
        maps_s = out.forward_masked(images, active, "spconv")
    for a, b in zip(maps_s, maps_d):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for (name, bd), (_, bs) in zip(ref.named_buffers(), out.named_buffers()):
        torch.testing.assert_close(bs, bd, rtol=1e-9, atol=1e-9, msg=name)


def test_resnet18_no_visible_patch(model):
    active = MASKS["none_visible"]
    images = torch.randn(2, 2, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        maps = copy.deepcopy(model).forward_masked(images, active, "spconv")
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 96 // s) for c, s in zip((64, 128, 256, 512),
                                                                                       (4, 8, 16, 32))]
    assert all(torch.count_nonzero(m) == 0 for m in maps)


def test_resnet18_backward_on_cpu_raises(model):
    """The forward runs with gradients enabled; the backward names the problem and the way out."""
    m = copy.deepcopy(model).train()
    images = torch.randn(2, 2, 64, 96, dtype=torch.float64)
    maps = m.forward_masked(images, MASKS["random"], "spconv")
    with pytest.raises(RuntimeError, match="spconv's CPU build has no backward.*use|GPU"):
        sum(mp.sum() for mp in maps).backward()
