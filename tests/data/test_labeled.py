"""Labeled fine-tuning sets: CSV, class folders (COVID-CT layout), MedMNIST npz."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctssl.data.labeled import (
    ORGANMNIST_CLASSES,
    LabeledDataset,
    load_csv,
    load_image,
    load_image_folder,
    load_labeled,
    load_medmnist,
)
from ctssl.data.splits import nested_fractions

from .helpers import pydicom_file


def write_png(path: Path, value: int, size=(20, 30), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size, value, np.uint8)
    arr[0, 0] = 0
    if mode == "RGB":
        arr = np.stack([arr] * 3, -1)
    Image.fromarray(arr).save(path)
    return path


def write_csv(path: Path, rows, header=("path", "label", "patient")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_load_image_formats(tmp_path):
    png = load_image(write_png(tmp_path / "a.png", 255))
    assert png.dtype == np.float32 and png.shape == (20, 30) and png.max() == 1.0 and png.min() == 0.0
    rgb = load_image(write_png(tmp_path / "b.png", 128, mode="RGB"))
    assert rgb[1, 1] == pytest.approx(128 / 255, abs=1e-3)
    np.save(tmp_path / "hu.npy", np.array([[-1000, 0], [500, 1000]], np.int16))
    np.testing.assert_allclose(load_image(tmp_path / "hu.npy", "raw"), [[0, 0.5], [0.75, 1]])
    np.testing.assert_allclose(load_image(tmp_path / "hu.npy", (0, 1000)), [[0, 0.5], [1, 1]])
    np.save(tmp_path / "unit.npy", np.array([[0.2, 0.4]], np.float32))
    np.testing.assert_allclose(load_image(tmp_path / "unit.npy"), [[0.2, 0.4]])
    ct = load_image(pydicom_file("CT_small.dcm"), "lung")
    assert ct.shape == (128, 128) and 0 <= ct.min() and ct.max() <= 1
    with pytest.raises(ValueError, match="cannot read .*no pixel data"):
        load_image(pydicom_file("rtplan.dcm"))


def test_csv_with_patients_splits_patient_wise(tmp_path):
    rows = []
    for p in range(12):
        for k in range(4):
            label = "covid" if (p + k) % 2 else "normal"
            write_png(tmp_path / "img" / f"{p}_{k}.png", 40 * k + 10)
            rows.append((f"img/{p}_{k}.png", label, f"patient{p}"))
    splits = load_csv(write_csv(tmp_path / "labels.csv", rows), seed=0, size=16, channels=3)
    assert set(splits) == {"train", "val", "test"}
    assert sum(len(d) for d in splits.values()) == 48
    groups = [set(d.patients) for d in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    train = splits["train"]
    assert train.classes == ["covid", "normal"] and train.num_classes == 2
    assert isinstance(train.labels, np.ndarray) and train.labels.dtype == np.int64
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    other = load_csv(tmp_path / "labels.csv", seed=1)
    assert set(other["test"].patients) != groups[2]


def test_csv_given_splits_are_kept_and_missing_val_is_carved_from_train(tmp_path):
    write_png(tmp_path / "x.png", 100)
    rows = [("x.png", k % 3, "", "train") for k in range(30)] + [("x.png", k % 3, "", "test") for k in range(6)]
    path = write_csv(tmp_path / "s.csv", rows, header=("path", "label", "patient_unused", "split"))
    splits = load_csv(path, seed=0)
    assert len(splits["test"]) == 6
    assert len(splits["train"]) + len(splits["val"]) == 30 and len(splits["val"]) > 0
    assert splits["train"].patients is None
    assert splits["train"].classes == ["0", "1", "2"]
    bad = write_csv(tmp_path / "bad.csv", [("x.png", 0, "", "holdout")], header=("path", "label", "p", "split"))
    with pytest.raises(ValueError, match="unknown split"):
        load_csv(bad)
    with pytest.raises(ValueError, match="needs a 'label' column"):
        load_csv(write_csv(tmp_path / "nolabel.csv", [("x.png",)], header=("path",)))


def test_class_folders_with_split_lists(tmp_path):
    root = tmp_path / "Images-processed"
    names = {"CT_COVID": [], "CT_NonCOVID": []}
    for c, value in (("CT_COVID", 200), ("CT_NonCOVID", 50)):
        for k in range(10):
            write_png(root / c / f"{c}_{k}.png", value)
            names[c].append(f"{c}_{k}.png")
    lists = tmp_path / "Data-split"
    lists.mkdir()
    split_files = {}
    for split, ks in (("train", range(0, 6)), ("val", range(6, 8)), ("test", range(8, 10))):
        split_files[split] = []
        for c in names:
            f = lists / f"{split}CT_{c}.txt"
            f.write_text("\n".join(names[c][k] for k in ks) + "\n")
            split_files[split].append(f)
    splits = load_image_folder(root, split_lists=split_files, size=8)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert splits["train"].classes == ["CT_COVID", "CT_NonCOVID"]
    for s in splits.values():
        for path, label in zip(s.samples, s.labels):
            assert Path(path).parent.name == s.classes[label]
    x, y = splits["test"][0]
    assert x.shape == (1, 8, 8)
    expected = 200 / 255 if y == 0 else 50 / 255
    assert float(x[0, 4, 4]) == pytest.approx(expected, abs=1e-3)


def test_class_folders_with_split_dirs_and_random_split(tmp_path):
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            for k in range(3):
                write_png(tmp_path / "given" / split / c / f"{k}.png", 10)
    given = load_labeled(tmp_path / "given")
    assert [len(given[s]) for s in ("train", "val", "test")] == [6, 6, 6]
    for c in ("a", "b"):
        for k in range(10):
            write_png(tmp_path / "flat" / c / f"pt{k // 2}_{k}.png", 10)
    flat = load_image_folder(tmp_path / "flat", patient_regex=r"(pt\d+)_", seed=0)
    assert sum(len(d) for d in flat.values()) == 20
    groups = [set(flat[s].patients) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 33), ("val", 7), ("test", 9)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (n, 1), dtype=np.uint8)
    arrays["train_labels"][:11, 0] = np.arange(11)
    np.savez(tmp_path / "organsmnist.npz", **arrays)
    splits = load_medmnist(tmp_path / "organsmnist.npz", size=32, channels=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [33, 7, 9]
    train = splits["train"]
    assert train.classes == ORGANMNIST_CLASSES and train.num_classes == 11
    np.testing.assert_array_equal(train.labels, arrays["train_labels"][:, 0])
    x, y = train[4]
    assert x.shape == (3, 32, 32) and y == 4
    np.testing.assert_allclose(train.image(4), arrays["train_images"][4] / 255.0, atol=1e-6)
    shutil.copy(tmp_path / "organsmnist.npz", tmp_path / "other.npz")
    assert load_labeled(tmp_path / "other.npz")["val"].classes == [str(i) for i in range(11)]
    np.savez(tmp_path / "broken.npz", train_images=arrays["train_images"])
    with pytest.raises(ValueError, match="not a MedMNIST file"):
        load_medmnist(tmp_path / "broken.npz")


def test_subset_for_few_label_fractions_and_transform():
    images = np.zeros((20, 10, 10), np.uint8)
    labels = np.array([0, 1] * 10)
    ds = LabeledDataset(images, labels, ["neg", "pos"], patients=[f"p{k}" for k in range(20)], size=10)
    idx = nested_fractions(ds.labels, (0.1, 1.0), seed=0)[0.1]
    small = ds.subset(idx)
    assert len(small) == 2 and sorted(small.labels) == [0, 1]
    assert small.patients == [f"p{k}" for k in idx]
    views = LabeledDataset(images, labels, transform=lambda x: [x, x])[0][0]
    assert isinstance(views, list) and views[0].shape == (1, 10, 10)
    with pytest.raises(ValueError, match="samples but"):
        LabeledDataset(images, labels[:5])
