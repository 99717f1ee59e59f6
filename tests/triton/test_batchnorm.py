"""BatchNorm kernels (statistics, fused apply, backward, running statistics) against the dense reference."""
import copy

import pytest
import torch
from torch import nn

from ctssl.sparse import PackedTensor
from ctssl.sparse.backends.triton import PendingBatchNorm, TritonBackend
from ctssl.sparse.modules import BatchNorm2d, Conv2d, ReLU

from ..sparse.helpers import random_batchnorm
from .util import F64, compare_module, needs_triton, rel_err, sparse_at

pytestmark = needs_triton


def _bn(c=5, **kw):
    return random_batchnorm(c, **kw)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_matches_dense(train, rng):
    compare_module(lambda: _bn(), 5, 4, rng, dtypes=(torch.float32, torch.float16), train=train)


def test_batchnorm_cumulative_momentum_and_no_affine(rng):
    compare_module(lambda: _bn(momentum=None), 5, 8, rng)
    compare_module(lambda: _bn(affine=False, track_running_stats=False), 5, 8, rng)


class ConvBnBlock(nn.Module):
    """relu(bn1(conv1(x)) + shortcut): the shortcut is a second conv + BN, the input, or nothing."""

    def __init__(self, c, shortcut):
        super().__init__()
        self.conv1, self.bn1, self.relu = Conv2d(c, c, 3, 1, 1, bias=False), _bn(c), ReLU(inplace=True)
        self.conv2, self.bn2 = Conv2d(c, c, 1, bias=False), _bn(c)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if self.shortcut == "bn":
            y = y + self.bn2(self.conv2(x))
        elif self.shortcut == "identity":
            y = x + y  # the pending BN on the right-hand side
        return self.relu(y)


@pytest.mark.parametrize("shortcut", ["bn", "identity", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_bn_add_relu_matches_dense(shortcut, train, rng):
    compare_module(lambda: ConvBnBlock(17, shortcut), 17, 4, rng, train=train)


def test_fusion_happens_and_stays_exact():
    """bn(x) is pending; relu and add consume it without applying it alone; reading values applies it."""
    torch.manual_seed(0)
    x = sparse_at(torch.randn(2, 3, 64, 64), torch.rand(2, 2, 2) < 0.7, "triton", stride=4)
    conv, bn, bn2 = Conv2d(3, 3, 3, 1, 1), _bn(3), _bn(3)
    y = bn(conv(x))
    assert isinstance(y, PendingBatchNorm) and y.unapplied
    s = y + bn2(conv(x))
    assert isinstance(s, PendingBatchNorm) and s.pending.x2 is not None and y.unapplied
    out = ReLU()(s)
    assert type(out) is PackedTensor and y.unapplied
    # the same block unfused
    with torch.no_grad():
        for b in (bn, bn2):
            b.num_batches_tracked.zero_()
    ref_be = TritonBackend(fuse=False)
    xr = x.with_values(x.values)
    xr.backend = ref_be
    bn_r, bn2_r = _bn(3), _bn(3)
    bn_r.load_state_dict(bn.state_dict())
    bn2_r.load_state_dict(bn2.state_dict())
    ref = ReLU()(bn_r(conv(xr)) + bn2_r(conv(xr)))
    assert type(ref) is PackedTensor
    assert rel_err(out.values.detach(), ref.values.detach()) < 1e-6
    # reading a pending tensor applies the BN alone, once, and later fusion still is exact
    z = bn(conv(x))
    v = z.values
    assert not z.unapplied and z.values is v
    assert torch.equal(ReLU()(z).values, torch.relu(v))


def test_conv_epilogue_statistics_equal_a_separate_pass(rng):
    x = sparse_at(torch.randn(2, 5, 64, 96, generator=rng), torch.rand(2, 2, 3, generator=rng) < 0.6, "triton", 4)
    conv = Conv2d(5, 7, 3, 1, 1)
    y = conv(x)
    from ctssl.kernels.batchnorm import finalize_stats, partial_stats
    M = y.values.shape[0]
    fused = finalize_stats(y.bn_partials(y.values), M, None, None, 0.1, 1e-5, False)
    separate = finalize_stats(partial_stats(y.values), M, None, None, 0.1, 1e-5, False)
    ref = y.values.double()
    assert rel_err(fused[0], ref.mean(0)) < 1e-6 and rel_err(separate[0], ref.mean(0)) < 1e-6
    invstd = torch.rsqrt(ref.var(0, unbiased=False) + 1e-5)
    assert rel_err(fused[1], invstd) < 1e-6 and rel_err(separate[1], invstd) < 1e-6
    # modified values no longer match the epilogue's statistics
    y.values.add_(1)
    assert y.bn_partials(y.values) is None


@pytest.mark.parametrize("visible", [1, 0])
def test_one_or_zero_visible_rows_behave_like_torch_backend(visible):
    images = torch.randn(1, 3, 32, 32, dtype=F64)
    active = torch.full((1, 1, 1), bool(visible))
    outs = {}
    bn0 = _bn(3)
    for backend in ("torch", "triton"):
        bn = copy.deepcopy(bn0).to(F64 if backend == "torch" else torch.float32)
        x = images.clone() if backend == "torch" else images.float()
        x.requires_grad_(True)
        y = ReLU()(bn(sparse_at(x, active, backend, stride=32))).to_dense()
        y.sum().backward()
        outs[backend] = (y.detach(), x.grad, bn.running_mean.clone(), bn.running_var.clone())
    for a, b in zip(outs["triton"], outs["torch"]):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-6


def test_batch_norm_rejects_wrong_channel_count():
    x = sparse_at(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(ValueError, match="expected 4 channels, got 3"):
        BatchNorm2d(4)(x)
