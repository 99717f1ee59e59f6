"""SimCLR, MoCo v2, BYOL and SwAV: losses against direct formulas, queues, momentum, Sinkhorn, freezing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ctssl.ssl.base import pooled_features
from ctssl.ssl.byol import regression_loss
from ctssl.ssl.mocov2 import KeyQueue, info_nce
from ctssl.ssl.momentum import cosine_momentum, ema_update
from ctssl.ssl.simclr import nt_xent
from ctssl.ssl.swav import sinkhorn, swapped_prediction_loss

from .helpers import images, make_batch, tiny_method


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# --- SimCLR -------------------------------------------------------------------------
def test_nt_xent_matches_the_direct_formula():
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    t = 0.1
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n = 5
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(total / (2 * n), rel=1e-5)


# --- MoCo v2 ------------------------------------------------------------------------
def test_info_nce_matches_the_direct_formula():
    q, k, queue = unit(4, 6, 0), unit(4, 6, 1), unit(7, 6, 2)
    t = 0.07
    total = 0.0
    for i in range(4):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(7))
        total += -math.log(pos / (pos + neg))
    assert float(info_nce(q, k, queue, t)) == pytest.approx(total / 4, rel=1e-5)


def test_key_queue_enqueue_and_dequeue():
    queue = KeyQueue(5, 2)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))  # random unit keys before any real ones
    keys = torch.arange(1, 17, dtype=torch.float32).view(8, 2)
    queue.enqueue(keys[:3])
    assert torch.equal(queue.keys[:3], keys[:3]) and int(queue.ptr) == 3
    queue.enqueue(keys[3:6])  # wraps: slots 3, 4, then 0 (the oldest, keys[0], leaves)
    assert torch.equal(queue.keys, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    assert int(queue.ptr) == 1
    queue.enqueue(keys)  # more keys than slots: only the newest 5 stay
    assert set(map(tuple, queue.keys.tolist())) == set(map(tuple, keys[3:].tolist()))
    assert int(queue.ptr) == 1


def test_moco_enqueues_the_momentum_keys_and_larger_queue_than_data_works():
    m = tiny_method("mocov2", queue_size=1000)  # far more than the 4 images
    batch = make_batch(m, images(4))
    before = m.queue.keys.clone()
    out = m(batch)
    assert torch.isfinite(out["loss"])
    with torch.no_grad():
        keys = F.normalize(m.momentum_projector(pooled_features(m.momentum_backbone, batch[1])), dim=1)
    # keys changed the 4 oldest slots only; BN in train mode makes the recomputed keys identical
    assert torch.allclose(m.queue.keys[:4], keys, atol=1e-5)
    assert torch.equal(m.queue.keys[4:], before[4:]) and int(m.queue.ptr) == 4


def test_moco_momentum_update():
    m = tiny_method("mocov2", key_momentum=0.9)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    key_before = m.momentum_backbone.conv1.weight.clone()
    m.after_step(0, 10)
    expected = 0.9 * key_before + 0.1 * m.backbone.conv1.weight
    assert torch.allclose(m.momentum_backbone.conv1.weight, expected)


# --- BYOL ---------------------------------------------------------------------------
def test_byol_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(k, 100, 0.996) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_byol_target_follows_the_schedule():
    m = tiny_method("byol")
    with torch.no_grad():
        m.backbone.conv1.weight.add_(1.0)
    target_before = m.target_backbone.conv1.weight.clone()
    m.after_step(30, 100)
    tau = cosine_momentum(30, 100, 0.996)
    assert m.momentum == pytest.approx(tau)
    assert torch.allclose(m.target_backbone.conv1.weight, tau * target_before + (1 - tau) * m.backbone.conv1.weight)


def test_byol_regression_loss_formula_and_stop_gradient():
    p, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    expected = torch.stack([2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(3)]).mean()
    loss = regression_loss(p, z)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_ema_update_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * wa + 0.25 * b.weight)


# --- SwAV ---------------------------------------------------------------------------
def test_sinkhorn_marginals():
    scores = unit(12, 8, 0) @ unit(6, 8, 1).t()  # 12 samples, 6 prototypes
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (12, 6) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # every sample distributes mass 1
    q_many = sinkhorn(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(q_many.sum(dim=0), torch.full((6,), 12 / 6), rtol=1e-3, atol=1e-3)  # equipartition
    softmax = F.softmax(scores / 0.05, dim=1)
    spread = lambda a: float((a.sum(dim=0) - 2).abs().max())  # noqa: E731
    assert spread(q) < spread(softmax)
    torch.testing.assert_close(sinkhorn(scores + 3.0, 0.05, 3), q)  # shift invariant


def test_sinkhorn_matches_the_direct_iteration():
    scores = unit(5, 4, 2) @ unit(3, 4, 3).t()
    Q = torch.exp(scores.double() / 0.05).t()
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(dim=1, keepdim=True) * 3
        Q /= Q.sum(dim=0, keepdim=True) * 5
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3).double(), (Q * 5).t(), rtol=1e-5, atol=1e-7)


def test_swapped_prediction_loss_formula():
    scores = [torch.randn(3, 4) for _ in range(3)]
    codes = [F.softmax(torch.randn(3, 4), dim=1) for _ in range(2)]
    t = 0.1
    total = 0.0
    for i, q in enumerate(codes):
        sub = [-(q * F.log_softmax(scores[v] / t, dim=1)).sum(1).mean() for v in range(3) if v != i]
        total += sum(sub) / 2
    torch.testing.assert_close(swapped_prediction_loss(scores, codes, t), total / 2)


def test_swav_prototypes_frozen_then_trained():
    m = tiny_method("swav", freeze_prototypes_steps=2)
    batch = make_batch(m, images(4))
    opt = torch.optim.SGD([p for g in m.param_groups(1e-2) for p in g["params"]], lr=0.5, momentum=0.9,
                          weight_decay=1e-2)
    start = m.prototypes.weight.detach().clone()
    for step in range(3):
        backbone_before = m.backbone.conv1.weight.detach().clone()
        opt.zero_grad()
        m(batch)["loss"].backward()
        assert m.prototypes.weight.grad.abs().sum() > 0
        m.on_after_backward(step)
        opt.step()
        m.after_step(step, 3)
        assert not torch.equal(m.backbone.conv1.weight, backbone_before)
        if step < 2:
            torch.testing.assert_close(m.prototypes.weight, start, rtol=0, atol=1e-6)
    assert (m.prototypes.weight - start).abs().max() > 1e-3


def test_swav_freezing_in_epochs_uses_steps_per_epoch():
    m = tiny_method("swav", freeze_prototypes_steps=None, freeze_prototypes_epochs=2)
    assert m.prototypes_frozen(0)  # unknown epoch length: the first step is frozen
    m.after_step(0, total_steps=30)  # default epochs=200 -> 1 step per epoch
    assert m.prototypes_frozen(1) and not m.prototypes_frozen(2)
    m2 = tiny_method("swav", freeze_prototypes_steps=None, freeze_prototypes_epochs=2, steps_per_epoch=10)
    assert m2.prototypes_frozen(19) and not m2.prototypes_frozen(20)


def test_swav_queue_fills_then_joins_sinkhorn():
    m = tiny_method("swav", queue_length=8, queue_start_steps=0)
    batch = make_batch(m, images(4))
    used = []
    for step in range(3):
        out = m(batch)
        used.append(float(out["queue_used"]))
        m.after_step(step, 3)
    assert used == [0.0, 0.0, 1.0]  # the queue joins once full (two batches of 4)
    z = m.embed(batch)
    assert m.queue.features.shape == (2, 8, m.hparams["proj_dim"])
    # newest first: the latest global-crop embeddings head the queue
    torch.testing.assert_close(m.queue.features[0, :4], z[:4].detach(), rtol=1e-4, atol=1e-5)


def test_swav_multicrop_views_of_two_sizes():
    m = tiny_method("swav")
    batch = make_batch(m, images(2))
    assert len(batch) == 4 and batch[0].shape[-1] == 64 and batch[2].shape[-1] == 32
    assert torch.isfinite(m(batch)["loss"])


def test_contrastive_batches_must_be_view_lists():
    m = tiny_method("simclr")
    with pytest.raises(TypeError, match="list of view tensors"):
        m(torch.rand(2, 1, 64, 64))
