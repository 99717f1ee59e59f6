"""Training: self-supervised pre-training (``ctssl-train``) and fine-tuning of the backbones.

Pre-training pieces: ``config`` (PretrainConfig, presets), ``pretrain`` (the loop,
``run_pretraining``), ``checkpoint`` (atomic checkpoints, ``export_backbone``),
``weights`` (``read_weights``: every weights file ctssl reads, ``--init``), ``optim`` (LAMB,
LARS), ``schedule``, ``distributed`` (DDP, sync BN, resumable sampler), ``logger``,
``viz``. Names are imported lazily, so importing one submodule does not pull in the others.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "PretrainConfig": "ctssl.train.config",
    "ConfigError": "ctssl.train.config",
    "run_pretraining": "ctssl.train.pretrain",
    "TrainingError": "ctssl.train.pretrain",
    "CheckpointError": "ctssl.train.checkpoint",
    "read_weights": "ctssl.train.weights",
    "WeightsError": "ctssl.train.weights",
    "load_checkpoint": "ctssl.train.checkpoint",
    "export_backbone": "ctssl.train.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctssl.train' has no attribute {name!r}")


__all__ = list(_LAZY)
