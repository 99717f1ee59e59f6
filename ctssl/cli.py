"""Console entry points. Each one imports its subsystem lazily so `--help` is fast."""
from __future__ import annotations

import sys


def _run(module: str, argv=None) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def train(argv=None) -> int:
    """ctssl-train: SparK or contrastive pre-training."""
    return _run("ctssl.train.pretrain_cli", argv)


def finetune(argv=None) -> int:
    """ctssl-finetune: fine-tune or linear-probe a backbone on a labeled set."""
    return _run("ctssl.train.finetune_cli", argv)


def sweep(argv=None) -> int:
    """ctssl-sweep: methods x label fractions x seeds, resumable, with the report."""
    return _run("ctssl.train.sweep", argv)


def study(argv=None) -> int:
    """ctssl-study: the whole few-label study end to end (data, pre-training, sweep, report)."""
    return _run("ctssl.train.study", argv)


def prepare(argv=None) -> int:
    """ctssl-prepare: DICOM tree -> prepared slice store."""
    return _run("ctssl.data.prepare", argv)


def phantoms(argv=None) -> int:
    """ctssl-phantoms: write the built-in synthetic CT set as DICOM."""
    return _run("ctssl.data.phantom", argv)


def demo(argv=None) -> int:
    """ctssl-demo: masked ResNet forward on every usable backend, checked against dense."""
    return _run("ctssl.demo", argv)


def backends(argv=None) -> int:
    """ctssl-backends: list every backend and why it is or is not usable here."""
    from ctssl.sparse import backend_status

    for name, reason in backend_status().items():
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train())
