"""ConvNeXt on the triton backend: the depthwise conv (forward, input and weight gradient, up to 3 patches
away), LayerNorm over rows, their fused kernel, and a whole small ConvNeXt, against the dense float64
reference."""
import copy

import pytest
import torch
from torch import nn

import ctssl.kernels.runtime as runtime
from ctssl.models import ConvNeXt
from ctssl.sparse.backends.triton import PendingDepthwise, TritonBackend
from ctssl.sparse.modules import Conv2d, LayerNorm, LayerNorm2d

from .util import F64, compare_module, edge_masks, grad_weight, needs_triton, rel_err, sparse_at

pytestmark = needs_triton


def _randomized(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 1.0) + (p.dim() == 1))
    return module


def depthwise(c: int, k: int = 7, bias: bool = True) -> Conv2d:
    return _randomized(Conv2d(c, c, k, 1, k // 2, groups=c, bias=bias))


def edge_mask(rng):
    """One (B=3, 2x3 patches) mask with an image without a visible patch, a full one and a random one
    (the interpreter's cost is per op, and a 7x7 kernel unrolls 49 taps: one mask per case)."""
    return edge_masks(3, 2, 3, rng)[1:2]


@pytest.mark.parametrize("k,stride,c", [
    (7, 4, 5),   # patch side 8: the 7x7 window reads the 8 neighbours (radius 1)
    (7, 16, 6),  # side 2: two patches away (radius 2)
    (7, 32, 3),  # side 1: three patches away (radius 3)
    (3, 8, 6),
    (5, 16, 4),
])
def test_depthwise_conv_matches_dense(k, stride, c, rng):
    compare_module(lambda: depthwise(c, k, bias=stride != 8), c, stride, rng, masks=edge_mask(rng))


@pytest.mark.parametrize("stride,c,dtypes", [(4, 5, (torch.float32, torch.bfloat16)), (16, 70, (torch.float32,)),
                                             (32, 3, (torch.float16,))])
def test_depthwise_conv_then_layer_norm_runs_fused_and_matches_dense(stride, c, dtypes, rng):
    """70 channels: two channel blocks, whose statistics the fused kernel combines."""
    make = lambda: nn.Sequential(depthwise(c), _randomized(LayerNorm(c, eps=1e-6)))  # noqa: E731
    compare_module(make, c, stride, rng, dtypes=dtypes, masks=edge_mask(rng))


def test_fused_and_unfused_paths_agree(rng):
    images = torch.randn(2, 6, 64, 64, generator=rng)
    active = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    block = nn.Sequential(depthwise(6), _randomized(LayerNorm(6, eps=1e-6)))
    outs = []
    for fuse in (True, False):
        m, x = copy.deepcopy(block), images.clone().requires_grad_(True)
        s = sparse_at(x, active, TritonBackend(fuse=fuse), 8)
        conv = m[0](s)
        assert isinstance(conv, PendingDepthwise) == fuse and (not fuse or conv.unapplied)
        y = m[1](conv).to_dense()
        assert not fuse or conv.unapplied  # the fused kernel never materialised the pending conv alone
        (y * grad_weight(y.shape).float()).sum().backward()
        outs.append([y.detach(), x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("c,affine", [(5, True), (300, True), (24, False)])
def test_layer_norm_over_rows_matches_dense(c, affine, rng):
    """LayerNorm2d as after ConvNeXt's stem and before its downsampling convs (300: several channel blocks)."""
    compare_module(lambda: _randomized(LayerNorm2d(c, eps=1e-6, elementwise_affine=affine)), c, 8, rng,
                   dtypes=(torch.float32, torch.bfloat16) if c == 5 else (torch.float32,), masks=edge_mask(rng))


def test_no_visible_patch_at_all(rng):
    empty = torch.zeros(2, 2, 3, dtype=torch.bool)
    compare_module(lambda: nn.Sequential(depthwise(4), LayerNorm(4)), 4, 16, rng, batch=2, masks=[empty])


def test_small_convnext_matches_dense(rng):
    """A whole ConvNeXt (stem, downsampling, blocks at every patch side) in float32 against float64 dense."""
    torch.manual_seed(0)
    model = ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 64, 96, generator=gen, dtype=F64)
    active = torch.tensor([[[False] * 3] * 2, [[True] * 3] * 2, [[True, False, True], [False, False, True]]])
    weights = [grad_weight((3, c, 64 // s, 96 // s), seed=s) for c, s in zip(model.feature_channels, (4, 8, 16, 32))]

    def run(backend, dtype):
        m = copy.deepcopy(model).to(dtype)
        x = images.to(dtype).detach().clone().requires_grad_(True)
        maps = m.forward_masked(x, active, backend)
        sum((mp.double() * w).sum() for mp, w in zip(maps, weights)).backward()
        return [mp.detach() for mp in maps] + [x.grad] + [p.grad for n, p in m.named_parameters()
                                                          if not n.startswith("head.")]

    truth, ours = run("dense", F64), run(TritonBackend(), torch.float32)
    errs = [rel_err(a, b) for a, b in zip(ours, truth)]
    assert len(errs) == 4 + 1 + sum(1 for n, _ in model.named_parameters() if not n.startswith("head."))
    assert max(errs) < 1e-4, max(errs)


def test_weight_gradient_row_splits_agree_across_modes(monkeypatch, rng):
    """Force several row splits (as on a GPU with many SMs): fixed-order sum, atomics and one split agree."""
    images = torch.randn(2, 4, 64, 96, generator=rng)
    active = torch.tensor([[[True, False, True], [True, True, False]], [[False, True, True], [True, False, False]]])

    def grads(backend):
        conv = depthwise(4)
        s = sparse_at(images, active, backend, 4)
        y = conv(s).to_dense()
        (y * grad_weight(y.shape).float()).sum().backward()
        return conv.weight.grad

    monkeypatch.setattr(runtime, "num_sms", lambda device: 64)
    det, again, fast = grads(TritonBackend(deterministic=True)), grads(TritonBackend(deterministic=True)), \
        grads(TritonBackend(deterministic=False))
    monkeypatch.setattr(runtime, "num_sms", lambda device: 1)
    one = grads(TritonBackend(deterministic=True))
    assert torch.equal(det, again)
    assert rel_err(fast, det) < 1e-6 and rel_err(one, det) < 1e-6


def test_other_grouped_convs_are_refused_with_the_reason():
    x = sparse_at(torch.randn(1, 4, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), TritonBackend(), 4)
    for conv, why in ((Conv2d(4, 4, 3, 1, 1, groups=2), "groups=2 is implemented only as a depthwise conv"),
                      (Conv2d(4, 8, 3, 1, 1, groups=4), "weight \\(8, 1, 3, 3\\)"),
                      (Conv2d(4, 4, 3, 2, 1, groups=4), "stride \\(2, 2\\)")):
        with pytest.raises(NotImplementedError, match=f"triton.*{why}"):
            conv(x)
    with pytest.raises(NotImplementedError, match="odd kernels up to 7, got 9"):
        Conv2d(4, 4, 9, 1, 4, groups=4)(x)
