"""Fixtures for the trainer tests: tiny prepared slice stores and tiny run configs (CPU, ResNet-18, 64 px)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ctssl.train.config import PretrainConfig

from ..ssl.helpers import SIZE, TINY_HPARAMS  # small heads, queues and decoders: fast steps


def _make_store(root: Path, n_patients: int, slices: int) -> Path:
    from ctssl.data import make_synthetic_ct, prepare_store

    synthetic = make_synthetic_ct(root / "synthetic", n_patients=n_patients, slices_per_series=slices, size=SIZE,
                                  seed=3, labeled=False)
    prepare_store(synthetic.dicom_dir, root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="session")
def pretrain_store(tmp_path_factory) -> Path:
    """A prepared store of 16 phantom slices (2 patients x 8), 64x64. Read-only for tests."""
    return _make_store(tmp_path_factory.mktemp("pretrain_store"), 2, 8)


@pytest.fixture(scope="session")
def one_batch_store(tmp_path_factory) -> Path:
    """A prepared store of exactly 4 slices: with batch 4 every step sees the same images."""
    return _make_store(tmp_path_factory.mktemp("one_batch_store"), 1, 4)


@pytest.fixture(scope="session")
def batch32_store(tmp_path_factory) -> Path:
    """A prepared store of 32 slices: one global batch of the paper presets' SparK (batch 32)."""
    return _make_store(tmp_path_factory.mktemp("batch32_store"), 2, 16)


@pytest.fixture
def single_thread(intra_op_threads):
    """One intra-op thread: at these sizes threads only add contention on the shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(method, data, out, **fields)``: a CPU run of ResNet-18 on 64 px images, batch 4."""

    def make(method: str, data, out, **fields) -> PretrainConfig:
        base = PretrainConfig(
            method=method, arch="resnet18", in_chans=1, backend="torch", data=str(data), out=str(out),
            image_size=SIZE, batch_size=4, max_steps=2, epochs=1, workers=0, device="cpu", amp="none",
            channels_last=False, optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), momentum=0.9,
            weight_decay=0.01, weight_decay_end=None, warmup_steps=0, grad_clip=None, drop_path_rate=0.0,
            log_every=1, ckpt_every=1000, vis_every=1000, progress=False, tensorboard=False, seed=0,
            hparams=dict(TINY_HPARAMS[method]),
        )
        hparams = {**base.hparams, **fields.pop("hparams", {})}
        return dataclasses.replace(base, hparams=hparams, **fields).validate()

    return make
