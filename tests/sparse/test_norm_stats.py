"""The one statistics path (ctssl.sparse.norm_stats) and the public pending-BatchNorm protocol."""
import copy
import pathlib

import pytest
import torch
import torch.nn.functional as F

from ctssl.sparse import PatchIndex
from ctssl.sparse.backends.torch_packed import TorchBackend
from ctssl.sparse.batchnorm_rows import row_moments
from ctssl.sparse.modules import ReLU
from ctssl.sparse.norm_stats import NormStats, batch_norm_statistics, update_running
from ctssl.sparse.pending import PendingBatchNorm, PendingBN

from .helpers import random_batchnorm, rel_err

F64 = torch.float64


@pytest.mark.parametrize("rows", [5, 1])
@pytest.mark.parametrize("count_on_device", [False, True])
def test_update_running_is_torchs_rule(rows, count_on_device):
    """Momentum average of the batch mean and the unbiased variance; nothing below two rows."""
    x = torch.randn(rows, 3, dtype=F64)
    rm0, rv0 = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    mean, var = row_moments(x)
    count = torch.tensor([float(rows)], dtype=F64) if count_on_device else rows
    update_running(rm, rv, mean, var, count, 0.1)
    if rows > 1:
        ref_m, ref_v = rm0.clone(), rv0.clone()
        F.batch_norm(x, ref_m, ref_v, None, None, True, 0.1, 1e-5)
        torch.testing.assert_close(rm, ref_m)
        torch.testing.assert_close(rv, ref_v)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_batch_norm_statistics_chooses_like_torch():
    x = torch.randn(6, 4, dtype=F64)
    rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64) * 2
    evaluated = batch_norm_statistics(x, rm, rv, False, 0.1, 1e-5, None, row_moments)
    assert not evaluated.batch and torch.allclose(evaluated.invstd, torch.rsqrt(rv + 1e-5))
    trained = batch_norm_statistics(x, rm, rv, True, 0.1, 1e-5, None, row_moments)
    assert trained.batch and trained.count == 6 and not trained.synchronized
    torch.testing.assert_close(trained.mean, x.mean(0))
    assert not torch.equal(rm, torch.zeros(4, dtype=F64))  # running statistics updated
    assert batch_norm_statistics(x[:0], None, None, True, 0.1, 1e-5, None, row_moments) is None
    sums = torch.randn(2, 4, dtype=F64)
    assert trained.reduce_grad_sums(sums) == (sums, 6.0)  # single process: local sums, local count


def test_no_kernel_module_communicates():
    """Kernels compute, the backend communicates: nothing in kernels/ touches torch.distributed."""
    kernels = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    offenders = [p.name for p in kernels.glob("*.py") if "torch.distributed" in p.read_text()]
    assert offenders == []


class _ProtocolBackend(TorchBackend):
    """A third-party backend using only the public protocol: BatchNorm deferred, relu and add folded in."""

    name = "protocol-demo"
    pending_activations = frozenset({"relu"})

    def __init__(self):
        self.applied = []

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps, process_group=None):
        stats = batch_norm_statistics(x.values, running_mean, running_var, training, momentum, eps, process_group,
                                      row_moments)
        return PendingBatchNorm(PendingBN(x.values, stats, weight, bias), x.index, x.stride, self)

    def apply_pending(self, p: PendingBN, activation):
        self.applied.append((activation, p.res is not None))
        y = (p.x1 - p.stats1.mean) * p.stats1.invstd * p.weight1 + p.bias1
        y = y if p.res is None else y + p.res
        return torch.relu(y) if activation == "relu" else y


def test_a_backend_fuses_through_the_public_pending_protocol():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen, dtype=F64)
    active = torch.rand(2, 2, 2, generator=gen) < 0.7
    active[0, 0, 0] = True
    bn = random_batchnorm(3).double()
    outs = {}
    for backend in (TorchBackend(), _ProtocolBackend()):
        x = backend.sparse_input(images, PatchIndex(active))
        y = ReLU()(copy.deepcopy(bn)(x) + x)
        outs[backend.name] = y.to_dense()
    assert rel_err(outs["protocol-demo"], outs["torch"]) < 1e-12
    assert backend.applied == [("relu", True)]  # bn + residual + relu: one apply pass


def test_pending_plus_pairs_only_where_the_backend_says_so():
    rows = torch.randn(4, 2)
    stats = NormStats(torch.zeros(2), torch.ones(2), 4, True)
    index = PatchIndex(torch.ones(1, 1, 1, dtype=torch.bool))
    be = _ProtocolBackend()
    first, second = (PendingBatchNorm(PendingBN(rows, stats, torch.ones(2), torch.zeros(2)), index, 32, be)
                     for _ in range(2))
    paired = first.pending.plus(second, pairs=True)
    assert paired.x2 is rows and paired.res is None and second.unapplied
    read = first.pending.plus(second, pairs=False)
    assert read.x2 is None and read.res is not None and not second.unapplied  # the other BN applied alone
