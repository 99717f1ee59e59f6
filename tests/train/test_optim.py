"""LAMB, LARS, the optimizer factory, the learning-rate / weight-decay schedules and gradient clipping."""
from __future__ import annotations

import math

import pytest
import torch

from ctssl.train.config import ConfigError
from ctssl.train.optim import Lamb, Lars, build_optimizer, clip_grad_norm, mark_decay_groups
from ctssl.train.schedule import CosineValue, WarmupCosine, build_schedule, scaled_lr


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    return w, b, grads


def test_lamb_matches_the_formula_for_two_steps():
    w, b, grads = _params()
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.95), 1e-6, 0.05
    opt = Lamb([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr, betas=(b1, b2),
               eps=eps)
    m_w = v_w = m_b = v_b = 0
    for t in (1, 2):
        gw, gb = grads[0] * t, grads[1] * t
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        # decayed tensor: Adam direction + decay, scaled by the trust ratio ||w|| / ||update||
        m_w = b1 * m_w + (1 - b1) * gw
        v_w = b2 * v_w + (1 - b2) * gw * gw
        update = (m_w / (1 - b1 ** t)) / ((v_w / (1 - b2 ** t)).sqrt() + eps) + wd * w0
        w0 = w0 - lr * (w0.norm() / update.norm()) * update
        # undecayed tensor (BN, bias): a plain Adam step, no layer adaptation
        m_b = b1 * m_b + (1 - b1) * gb
        v_b = b2 * v_b + (1 - b2) * gb * gb
        b0 = b0 - lr * (m_b / (1 - b1 ** t)) / ((v_b / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)


def test_lars_matches_the_formula():
    w, b, grads = _params(1)
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr, mom, wd, trust = 0.3, 0.9, 1e-4, 0.001
    opt = Lars([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr, momentum=mom,
               trust_coefficient=trust)
    buf_w = buf_b = None
    for t in (1, 2):
        gw, gb = grads[0] / t, grads[1] / t
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        scale = trust * w0.norm() / (gw.norm() + wd * w0.norm() + 1e-8)
        dw = (gw + wd * w0) * scale
        buf_w = dw if buf_w is None else mom * buf_w + dw
        buf_b = gb if buf_b is None else mom * buf_b + gb
        w0, b0 = w0 - lr * buf_w, b0 - lr * buf_b
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)


def test_build_optimizer_by_name_and_decay_groups():
    w, b, _ = _params()
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    groups = [{"name": "decay", "params": [w], "weight_decay": 0.04},
              {"name": "no_decay", "params": [b, frozen], "weight_decay": 0.0},
              {"name": "empty", "params": [frozen]}]
    marked = mark_decay_groups(groups, 0.04)
    assert [(g["name"], g["decayed"], len(g["params"])) for g in marked] == [("decay", True, 1), ("no_decay", False, 1)]
    kinds = {"lamb": Lamb, "lars": Lars, "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    for name, cls in kinds.items():
        opt = build_optimizer(name, groups, lr=0.1, weight_decay=0.04)
        assert type(opt) is cls and len(opt.param_groups) == 2
    assert build_optimizer("lamb", groups, 0.1, 0.04).defaults["betas"] == (0.9, 0.95)  # SparK's betas
    assert build_optimizer("adam", groups, 0.1, 0.04).defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'"):
        build_optimizer("rmsprop", groups, 0.1, 0.04)


def test_warmup_cosine_learning_rate():
    lr = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, final=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_spark_weight_decay_schedule_and_lr_scaling():
    wd = CosineValue(0.04, 0.2, total_steps=101)
    assert wd(0) == pytest.approx(0.04) and wd(100) == pytest.approx(0.2) and wd(50) == pytest.approx(0.12)
    assert scaled_lr(2e-4, 32) == pytest.approx(2.5e-5)  # SparK's base lr at the seed paper's batch 32
    assert scaled_lr(2e-4, 4096) == pytest.approx(3.2e-3)


def test_schedule_applies_lr_scale_and_decays_only_decayed_groups():
    w, b, _ = _params()
    opt = build_optimizer("lamb", [{"params": [w], "weight_decay": 0.04, "lr_scale": 0.5},
                                   {"params": [b], "weight_decay": 0.0}], lr=1.0, weight_decay=0.04)
    schedule = build_schedule(peak_lr=2.0, total_steps=20, warmup_steps=4, min_lr=0.0, weight_decay=0.04,
                              weight_decay_end=0.2)
    lr, wd = schedule.apply(opt, 19)
    assert wd == pytest.approx(0.2) and lr == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr) and opt.param_groups[1]["lr"] == pytest.approx(lr)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.2) and opt.param_groups[1]["weight_decay"] == 0.0
    assert schedule.differences(schedule.state_dict()) == []
    other = build_schedule(1.0, 20, 4, 0.0, 0.04, 0.2)
    assert other.differences(schedule.state_dict()) == ["lr.peak: 2.0 -> 1.0"]


def test_gradient_clipping_to_the_global_norm():
    w, b, grads = _params()
    w.grad, b.grad = grads[0] * 10, grads[1] * 10
    before = torch.cat([w.grad.flatten(), b.grad.flatten()]).norm()
    norm = clip_grad_norm([w, b], 5.0)
    assert norm == pytest.approx(before.item())
    assert torch.cat([w.grad.flatten(), b.grad.flatten()]).norm() == pytest.approx(5.0, rel=1e-5)
    assert clip_grad_norm([w, b], None) is None
