"""Per-step schedules: linear warm-up + cosine learning rate, SparK's cosine weight decay.

Both are pure functions of the step, so resuming needs only the step; ``state_dict`` records
the settings so a resumed run can tell when they changed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch.optim import Optimizer


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """SparK's (and MoCo's, SwAV's) linear scaling rule: ``base_lr x global_batch / 256``."""
    return base_lr * global_batch / reference_batch


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine down to ``final``."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    final: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineValue:
    """A value moving from ``start`` to ``end`` along half a cosine over ``total_steps`` (SparK's wd 0.04 -> 0.2)."""

    start: float
    end: float
    total_steps: int

    def __call__(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.total_steps - 1))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingSchedule:
    """The learning-rate and weight-decay schedules of a run, applied to an optimizer each step.

    Groups may carry ``lr_scale`` (multiplies the learning rate) and ``decayed`` (only those get
    the scheduled weight decay; the others keep 0).
    """

    def __init__(self, lr: WarmupCosine, weight_decay: CosineValue):
        self.lr = lr
        self.weight_decay = weight_decay

    def apply(self, optimizer: Optimizer, step: int) -> tuple[float, float]:
        lr, wd = self.lr(step), self.weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("decayed", True):
                group["weight_decay"] = wd
        return lr, wd

    def state_dict(self) -> dict:
        return {"lr": asdict(self.lr), "weight_decay": asdict(self.weight_decay)}

    def differences(self, state: dict) -> list[str]:
        """The settings that differ from a saved ``state_dict`` (for a warning when resuming)."""
        mine = self.state_dict()
        return [f"{part}.{k}: {state.get(part, {}).get(k)} -> {v}"
                for part in mine for k, v in mine[part].items() if state.get(part, {}).get(k) != v]


def build_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float, weight_decay: float,
                   weight_decay_end: float | None) -> TrainingSchedule:
    warmup_steps = max(0, min(warmup_steps, total_steps))
    wd_end = weight_decay if weight_decay_end is None else weight_decay_end
    return TrainingSchedule(WarmupCosine(peak_lr, total_steps, warmup_steps, min_lr),
                            CosineValue(weight_decay, wd_end, total_steps))


__all__ = ["scaled_lr", "WarmupCosine", "CosineValue", "TrainingSchedule", "build_schedule"]
