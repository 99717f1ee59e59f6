"""SliceStore and PretrainDataset: the contract the training code builds on."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctssl.data import PretrainDataset, SliceStore, SparkTransform, TwoViewTransform
from ctssl.data.intensity import apply_intensity
from ctssl.data.prepare import prepare_store


@pytest.fixture(scope="module")
def store_dir(phantom_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    prepare_store(phantom_set.dicom_dir, out, progress=False)
    return out


def test_store_length_records_and_patients(store_dir):
    store = SliceStore(store_dir)
    assert len(store) == 24 and len(store.series) == 3
    records = store.records
    assert len(records) == 24
    assert sorted(set(r.patient for r in records)) == [f"PHANTOM-7-{k:04d}" for k in range(3)]
    assert store.patients == [r.patient for r in records]
    for series in store.series:
        pos = [r.position for r in records if r.series == series["series"]]
        assert pos == sorted(pos) and len(pos) == 8
    assert records[0].shape == (48, 48) and records[0].spacing == pytest.approx((7.5, 7.5))
    assert store.read_hu(-1).shape == (48, 48)
    with pytest.raises(IndexError):
        store.read_hu(24)
    with pytest.raises(FileNotFoundError, match="ctssl-prepare"):
        SliceStore(store_dir / "nope")


def test_store_reads_are_copies_and_few_shards_stay_open(store_dir):
    store = SliceStore(store_dir, max_open_shards=1)
    a = store.read_hu(0)
    a[:] = 0
    assert store.read_hu(0).any()
    for i in range(len(store)):
        store.read_hu(i)
    assert len(store._open) == 1


def test_pretrain_items_are_unit_range_tensors_of_the_requested_size(store_dir):
    ds = PretrainDataset(store_dir, size=32, channels=3)
    x = ds[5]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x[0], x[1])
    full = PretrainDataset(store_dir, size=48)[5]  # no resize: raw min-max spans exactly [0, 1]
    assert float(full.min()) == 0.0 and float(full.max()) == 1.0
    lung = PretrainDataset(store_dir, size=48, intensity="lung")[5]
    expected = apply_intensity(SliceStore(store_dir).read_hu(5), "lung")
    np.testing.assert_allclose(lung[0].numpy(), expected, atol=1e-6)


def test_transform_receives_the_full_size_tensor(store_dir):
    seen = []

    def spy(x):
        seen.append(tuple(x.shape))
        return "views"

    ds = PretrainDataset(store_dir, size=32, transform=spy)
    assert ds[0] == "views" and seen == [(1, 48, 48)]
    views = PretrainDataset(store_dir, transform=TwoViewTransform(size=24))[0]
    assert isinstance(views, list) and [v.shape for v in views] == [(1, 24, 24)] * 2
    one = PretrainDataset(store_dir, transform=SparkTransform(24))[0]
    assert one.shape == (1, 24, 24)


def test_dataset_pickles_and_runs_in_dataloader_workers(store_dir):
    ds = PretrainDataset(store_dir, size=32, channels=1)
    ds[0]  # opens a memory map, which must not travel with the pickle
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3], ds[3])
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 3 and batches[0].shape == (8, 1, 32, 32)
    assert torch.equal(batches[0][3], ds[3])


def test_bad_arguments_fail_early(store_dir):
    with pytest.raises(ValueError):
        PretrainDataset(store_dir, channels=2)
    with pytest.raises(ValueError):
        PretrainDataset(store_dir, intensity="nope")
