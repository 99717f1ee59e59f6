"""The interface every method gives the trainer: creation, hparams, transforms, training, groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ctssl.models import resnet18
from ctssl.sparse.modules import SyncBatchNorm
from ctssl.ssl import METHODS, SSLMethod, create_method, method_class
from ctssl.ssl.base import COMMON_HPARAMS

from .helpers import SIZE, images, make_batch, tiny_method

STEPS = 10
LR = {"spark": 3e-3}


def test_method_names():
    assert set(METHODS) == {"spark", "simclr", "mocov2", "byol", "swav"}
    for name in METHODS:
        assert method_class(name).name == name


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="spark.*simclr.*mocov2.*byol.*swav"):
        create_method("dino", resnet18())


def test_unknown_hparam_is_refused():
    with pytest.raises(ValueError, match="unknown hparam.*tempreature"):
        create_method("simclr", resnet18(), tempreature=0.2)


@pytest.mark.parametrize("name", METHODS)
def test_default_hparams_have_the_trainer_keys(name):
    hp = method_class(name).default_hparams
    assert set(COMMON_HPARAMS) <= set(hp)
    assert hp["optimizer"] in {"lamb", "sgd", "adam", "lars"}


def test_paper_settings():
    spark, moco, byol, swav = (method_class(n).default_hparams for n in ("spark", "mocov2", "byol", "swav"))
    assert (spark["batch_size"], spark["optimizer"], spark["base_lr"], spark["mask_ratio"], spark["warmup_epochs"]) \
        == (32, "lamb", 2e-4, 0.6, 40)
    assert (moco["batch_size"], moco["optimizer"], moco["queue_size"], moco["key_momentum"], moco["temperature"]) \
        == (128, "sgd", 65536, 0.999, 0.07)
    assert (byol["batch_size"], byol["optimizer"], byol["base_lr"], byol["base_momentum"]) == (64, "adam", 1e-3, 0.996)
    assert (swav["batch_size"], swav["optimizer"], swav["num_prototypes"], swav["epsilon"],
            swav["sinkhorn_iterations"], swav["n_global_crops"], swav["n_local_crops"]) \
        == (128, "lars", 500, 0.05, 3, 2, 6)


@pytest.mark.parametrize("name", METHODS)
def test_train_transform_output(name):
    m = tiny_method(name)
    x = images(1)[0]
    out = m.train_transform(SIZE)(x, generator=torch.Generator().manual_seed(0))
    if name == "spark":
        assert isinstance(out, torch.Tensor) and out.shape == (1, SIZE, SIZE)
    else:
        n_views = 2 + (m.hparams["n_local_crops"] if name == "swav" else 0)
        assert isinstance(out, list) and len(out) == n_views
        assert out[0].shape == out[1].shape == (1, SIZE, SIZE)


@pytest.mark.parametrize("name", METHODS)
def test_trains_on_a_fixed_batch(name, record_property):
    """Finite scalar loss, gradients reach the backbone, and the loss falls within a few steps."""
    m = tiny_method(name)
    x = images(4)
    batch = make_batch(m, x)
    fixed = {}
    if name == "spark":
        fixed["active"] = m.random_mask(batch)
    if name == "mocov2":
        with torch.no_grad():  # fill the queue with real keys first (random keys are trivially easy)
            for _ in range(2):
                m(batch)
    opt = torch.optim.Adam([p for g in m.param_groups(0.0) for p in g["params"]], lr=LR.get(name, 1e-3))
    losses = []
    for step in range(STEPS):
        out = m(batch, **fixed)
        loss = out["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(v.dim() == 0 for v in out.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            g = m.backbone.conv1.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
            assert m.backbone.layer4[-1].conv2.weight.grad.abs().sum() > 0
        m.on_after_backward(step)
        opt.step()
        m.after_step(step, STEPS)
        losses.append(loss.item())
    # same batch, views and masks every step: measured 0.92 (spark) and below 0.61 (the others) on every kernel
    # set of benchmarks/results/2026-12-02-cpu-dev/portable-tests.md, spread under 0.03
    record_property("ratio", f"{sum(losses[-3:]) / sum(losses[:3]):.4f}")
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("name", METHODS)
def test_param_groups(name):
    m = tiny_method(name)
    groups = {g["name"]: g for g in m.param_groups(0.05)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    for module in m.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight.requires_grad:
            assert {id(module.weight), id(module.bias)} <= no_decay
    assert id(m.backbone.conv1.weight) in decay
    assert id(m.backbone.fc.weight) not in trainable  # the classifier is not pre-trained
    if name == "spark":
        assert {id(t) for t in m.mask_tokens} <= no_decay
    if name in ("mocov2", "byol"):
        target = m.momentum_backbone if name == "mocov2" else m.target_backbone
        assert not {id(p) for p in target.parameters()} & trainable


@pytest.mark.parametrize("name", ["spark", "simclr"])
def test_convert_sync_batchnorm_keeps_working_in_one_process(name):
    m = tiny_method(name).convert_sync_batchnorm()
    assert isinstance(m.backbone.bn1, SyncBatchNorm)
    if name == "simclr":
        assert any(isinstance(x, nn.SyncBatchNorm) for x in m.projector.modules())
        assert not any(type(x) is nn.BatchNorm1d for x in m.modules())
    out = m(make_batch(m, images(2)))
    assert torch.isfinite(out["loss"])


def test_methods_are_ssl_methods():
    for name in METHODS:
        assert issubclass(method_class(name), SSLMethod)
