"""Whole ResNet encoders on the triton backend: ``forward_masked`` forward and backward against dense."""
import copy

import pytest
import torch

from ctssl.models import create_resnet

from .util import F64, edge_masks, needs_triton, rel_err

pytestmark = needs_triton


def run_model(model, images, active, backend, loss_weights):
    """Forward + backward of ``forward_masked``: maps, image grad, parameter grads, buffers."""
    m = copy.deepcopy(model)
    x = images.detach().clone().requires_grad_(True)
    maps = m.forward_masked(x, active, backend)
    loss = sum((mp * w.to(mp.dtype)).sum() for mp, w in zip(maps, loss_weights))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in m.named_buffers() if b.is_floating_point()}
    return [mp.detach() for mp in maps], x.grad.clone(), grads, buffers


def errors(out, truth) -> torch.Tensor:
    """Relative errors of every map, the image gradient, every parameter gradient and BN buffer."""
    errs = [rel_err(a, b) for a, b in zip(out[0], truth[0])] + [rel_err(out[1], truth[1])]
    errs += [rel_err(out[2][n], truth[2][n]) for n in truth[2]]
    errs += [rel_err(out[3][n], truth[3][n]) for n in truth[3]]
    assert out[2].keys() == truth[2].keys() and len(truth[2]) > 0
    return torch.tensor(errs)


def _setup(arch, batch, H, W, train, seed=5):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = create_resnet(arch, in_chans=1).train(train)
    images = torch.randn(batch, 1, H, W, generator=gen)
    active = edge_masks(batch, H // 32, W // 32, gen)[1]  # an empty image, a full one, a random one
    weights = [torch.randn(batch, c, H // s, W // s, generator=gen, dtype=F64)
               for c, s in zip(model.feature_channels, model.feature_strides)]
    truth = run_model(model.to(F64), images.to(F64), active, "dense", weights)
    return model.float(), images, active, weights, truth


def test_resnet18_eval_equals_dense():
    """Eval mode (running statistics): every kernel's rounding only, float32 against float64."""
    model, images, active, weights, truth = _setup("resnet18", 2, 64, 96, train=False)
    out = run_model(model, images, active, "triton", weights)
    e = errors(out, truth)
    assert e.max() < 1e-4, e.max()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_training_step_is_as_accurate_as_dense_float32(arch):
    """Train mode: BN over the few visible rows of stride 32 amplifies float32 rounding in the
    backward for every layout, so triton is judged against float64 next to dense float32's own error."""
    batch, W = (3, 96) if arch == "resnet18" else (2, 64)
    model, images, active, weights, truth = _setup(arch, batch, 64, W, train=True)
    dense32 = errors(run_model(model, images, active, "dense", weights), truth)
    ours = errors(run_model(model, images, active, "triton", weights), truth)
    assert ours[:4].max() <= 3 * dense32[:4].max() + 1e-5, (ours[:4], dense32[:4])  # forward maps
    assert ours.max() <= 3 * dense32.max() + 1e-4, (ours.max(), dense32.max())


def test_resnet18_float16_step_is_as_accurate_as_torch_backend_float16():
    """float16 storage with float32 accumulation: maps within fp16 rounding of float64; gradients
    (which lose ~5% in float16 for every layout here, measured) within a small factor of the
    torch backend's float16 error."""
    model, images, active, weights, truth = _setup("resnet18", 2, 64, 64, train=False)
    out = run_model(model.half(), images.half(), active, "triton", weights)
    assert all(m.dtype == torch.float16 and torch.isfinite(m).all() for m in out[0])
    ours = errors(out, truth)
    torch16 = errors(run_model(model.half(), images.half(), active, "torch", weights), truth)
    assert ours[:4].max() < 3e-3, ours[:4]
    assert ours.max() <= 1.5 * torch16.max() + 1e-3, (ours.max(), torch16.max())
