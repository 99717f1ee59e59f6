"""Whole masked ResNet and ConvNeXt encoders on the operators' CPU loops against the dense reference."""
import copy

import pytest
import torch

from ctssl.models import convnext_tiny, create_resnet

from .helpers import CpuTwin, edge_masks, needs_ext, rel_err

pytestmark = needs_ext


def _run(model, images, active, backend, weights=None):
    m = copy.deepcopy(model)
    x = images.detach().clone().requires_grad_(True)
    maps = m.forward_masked(x, active, backend)
    if weights is None:
        gen = torch.Generator().manual_seed(3)
        weights = [torch.randn(mp.shape, generator=gen, dtype=mp.dtype) for mp in maps]
    sum((mp * w).sum() for mp, w in zip(maps, weights)).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    return [mp.detach() for mp in maps], x.grad, grads, dict(m.named_buffers()), weights


@pytest.mark.parametrize("arch,batch,H,W,train", [
    ("resnet18", 3, 64, 96, True), ("resnet18", 3, 64, 64, False),  # basic blocks, train and eval BN
    ("resnet50", 2, 64, 64, True),  # bottlenecks
])
def test_encoder_matches_dense_float64(arch, batch, H, W, train):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    model = create_resnet(arch).double().train(train)
    images = torch.randn(batch, 3, H, W, generator=gen, dtype=torch.float64)
    active = edge_masks(batch, H // 32, W // 32, gen)[1]  # random, with an empty and a full image
    ref = _run(model, images, active, "dense")
    out = _run(model, images, active, CpuTwin(), ref[4])
    for a, b in zip(out[0], ref[0]):
        assert rel_err(a, b) < 1e-9
    assert rel_err(out[1], ref[1]) < 1e-9
    assert ref[2].keys() == out[2].keys() and len(ref[2]) > 0
    for name in ref[2]:
        assert rel_err(out[2][name], ref[2][name]) < 1e-9, name
    for name in ref[3]:
        assert rel_err(out[3][name].double(), ref[3][name].double()) < 1e-9, name


def test_convnext_tiny_encoder_matches_dense_float64():
    """ConvNeXt-T (depthwise 7x7 convs reaching 1, 1, 2, 3 patches at strides 4..32, LayerNorm, MLP, layer
    scale) at 64 x 64, one image without a visible patch and one with a masked patch among visible ones: maps,
    input and every encoder parameter's grads."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = convnext_tiny(in_chans=1, ls_init_value=0.5).double().train()
    with torch.no_grad():  # the default init zeroes biases and shifts nothing: make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    images = torch.randn(2, 1, 64, 64, generator=gen, dtype=torch.float64)
    active = torch.tensor([[[False, False], [False, False]], [[True, True], [False, True]]])
    ref = _run(model, images, active, "dense")
    out = _run(model, images, active, CpuTwin(), ref[4])
    for a, b in zip(out[0], ref[0]):
        assert rel_err(a, b) < 1e-9
    assert rel_err(out[1], ref[1]) < 1e-9
    encoder_params = {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    assert encoder_params <= ref[2].keys() and ref[2].keys() == out[2].keys()
    for name in ref[2]:
        assert rel_err(out[2][name], ref[2][name]) < 1e-9, name


def test_encoder_float32_is_as_accurate_as_dense_float32():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = create_resnet("resnet18", in_chans=1).train()
    images = torch.randn(2, 1, 64, 64, generator=gen)
    active = edge_masks(2, 2, 2, gen)[0]
    truth = _run(model.double(), images.double(), active, "dense")
    w32 = [w.float() for w in truth[4]]
    model = model.float()
    dense32 = _run(model, images, active, "dense", w32)
    twin32 = _run(model, images, active, CpuTwin(), w32)

    def errors(out):
        errs = [rel_err(a, b) for a, b in zip(out[0], truth[0])] + [rel_err(out[1], truth[1])]
        return torch.tensor(errs + [rel_err(out[2][n], truth[2][n]) for n in truth[2]])

    e_dense, e_twin = errors(dense32), errors(twin32)
    assert e_twin[:4].max() < 1e-4
    assert (e_twin <= 10 * e_dense + 1e-5).all()


class _CountingOps:
    """torch.ops.ctssl with a record of how each bn_apply was called (residual, activation)."""

    def __init__(self, ops):
        self._ops, self.bn_apply_calls = ops, []

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def bn_apply(self, rows, mean, invstd, weight, bias, residual, activation):
        self.bn_apply_calls.append((residual is not None, activation))
        return self._ops.bn_apply(rows, mean, invstd, weight, bias, residual, activation)


@pytest.mark.parametrize("arch,blocks,relu_bns,downsamples", [("resnet18", 8, 1 + 8, 3), ("resnet50", 16, 1 + 32, 4)])
def test_block_tails_run_as_one_fused_batchnorm_pass(monkeypatch, arch, blocks, relu_bns, downsamples):
    """Every ``relu(bn(x))`` and ``relu(bn(x) + identity)`` is one bn_apply call; only the
    downsample BNs (read as a residual) run alone."""
    from ctssl.cuda_ops import batchnorm

    counting = _CountingOps(torch.ops.ctssl)
    monkeypatch.setattr(batchnorm, "ops", lambda: counting)
    model = create_resnet(arch).double().train()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    model.forward_masked(images, active, CpuTwin())
    calls = counting.bn_apply_calls
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(calls) == n_bn
    assert calls.count((True, 1)) == blocks  # each block's tail: bn + identity + relu
    assert calls.count((False, 1)) == relu_bns  # the stem's and the blocks' inner bn + relu
    assert calls.count((False, 0)) == downsamples  # shortcut BNs, read as the residual


def test_bf16_autocast_encoder_is_as_accurate_as_dense_bf16():
    """The glue's autocast path (rows cast to bf16, BN on bf16 rows with fp32 weights, fused bf16
    residual) on the CPU's autocast, judged against float64 next to the emulation's own bf16 error."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = create_resnet("resnet18").train()
    images = torch.randn(2, 3, 96, 96, generator=gen)
    active = edge_masks(2, 3, 3, gen)[0]

    def run(m, x, backend, weights, amp):
        m, x = copy.deepcopy(m), x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            maps = m.forward_masked(x, active, backend)
            loss = sum((mp.float() * w.float()).sum() for mp, w in zip(maps, weights))
        assert all(mp.dtype == (torch.bfloat16 if amp else x.dtype) for mp in maps)
        loss.backward()
        out = [mp.detach().double() for mp in maps] + [x.grad.double()]
        out += [p.grad.double() for n, p in m.named_parameters() if not n.startswith("fc.")]
        return out + [b.double() for b in m.buffers() if b.is_floating_point()]

    weights = [torch.randn(mp.shape, generator=gen, dtype=torch.float64)
               for mp in model.double().forward_masked(images.double(), active, "dense")]
    truth = run(model, images.double(), "dense", weights, False)
    model = model.float()
    e_dense = torch.tensor([rel_err(a, b) for a, b in zip(run(model, images, "dense", weights, True), truth)])
    e_twin = torch.tensor([rel_err(a, b) for a, b in zip(run(model, images, CpuTwin(), weights, True), truth)])
    assert 1e-4 < e_dense[:4].max() < 0.1  # bf16 really ran
    assert e_twin[:4].max() <= 2 * e_dense[:4].max() + 1e-3, (e_twin[:4], e_dense[:4])
    assert e_twin.max() <= 3 * e_dense.max() + 1e-3, (e_twin.max(), e_dense.max())
