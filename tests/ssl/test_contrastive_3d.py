"""Contrastive baselines on volumes: 3-D views, a training step of SimCLR / MoCo v2 / BYOL with resnet18_3d, and a
clear refusal from SwAV (multi-crop of 2-D slices only)."""
from __future__ import annotations

import pytest
import torch

from ctssl.data.augment import RandomFlip3d, TwoViewTransform3d, crop_box_3d, random_resized_crop_3d
from ctssl.models import resnet18_3d
from ctssl.ssl import create_method

from .helpers import TINY_HPARAMS

SIZE = 32  # one 32^3 patch: the smallest input of a stride-32 encoder


def test_3d_crop_box_and_resize():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        start, size = crop_box_3d((40, 30, 50), (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert all(0 <= s and 0 < n and s + n <= m for s, n, m in zip(start, size, (40, 30, 50)))
    x = torch.rand(1, 40, 30, 50)
    assert random_resized_crop_3d(x, 16, generator=g).shape == (1, 16, 16, 16)
    # a cube of the whole volume fits no axis of 30: after ten tries the whole volume, unchanged
    whole = random_resized_crop_3d(x, (40, 30, 50), scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    assert torch.equal(whole, x)


def test_flip3d_flips_each_axis():
    x = torch.arange(8.0).view(1, 2, 2, 2)
    assert torch.equal(RandomFlip3d(1.0)(x), x.flip(-3, -2, -1))
    assert torch.equal(RandomFlip3d(0.0)(x), x)


def test_two_view_transform_3d_views_differ_and_stay_in_range():
    x = torch.rand(1, 48, 48, 48)
    v1, v2 = TwoViewTransform3d(SIZE)(x, generator=torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (1, SIZE, SIZE, SIZE)
    assert not torch.equal(v1, v2) and 0 <= float(v1.min()) and float(v1.max()) <= 1


@pytest.mark.parametrize("name", ["simclr", "mocov2", "byol"])
def test_one_training_step_with_resnet18_3d(name):
    torch.manual_seed(0)
    method = create_method(name, resnet18_3d(in_chans=1), backend="torch", **TINY_HPARAMS[name])
    transform = method.train_transform(SIZE)
    g = torch.Generator().manual_seed(0)
    batch = torch.utils.data.default_collate([transform(torch.rand(1, 40, 40, 40), generator=g) for _ in range(3)])
    assert [tuple(v.shape) for v in batch] == [(3, 1, SIZE, SIZE, SIZE)] * 2
    params = [p for p in method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = method(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    optimizer.step()
    method.after_step(0, 10)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_swav_refuses_3d_encoders_naming_method_and_arch():
    with pytest.raises(ValueError, match=r"swav does not support 3-D encoders \(ResNet\)"):
        create_method("swav", resnet18_3d(in_chans=1), **TINY_HPARAMS["swav"])


def test_contrastive_views_must_match_the_encoder():
    method = create_method("simclr", resnet18_3d(in_chans=1), **TINY_HPARAMS["simclr"])
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        method([torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)])
