"""Few-label fractions and train/val/test splits."""

from __future__ import annotations

import numpy as np
import pytest

from ctssl.data.splits import (
    DEFAULT_FRACTIONS,
    nested_fractions,
    patient_split,
    read_fractions,
    stratified_split,
    write_fractions,
)

LABELS = np.array([0] * 300 + [1] * 120 + [2] * 30 + [3] * 3)


def test_default_fractions_match_the_study():
    assert DEFAULT_FRACTIONS == (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def test_fractions_nested_stratified_and_every_class_kept():
    subsets = nested_fractions(LABELS, seed=0)
    assert sorted(subsets) == list(DEFAULT_FRACTIONS)
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small]) <= set(subsets[large])
    for f, idx in subsets.items():
        counts = np.bincount(LABELS[idx], minlength=4)
        assert (counts >= 1).all()
        assert len(np.unique(idx)) == len(idx)
        expected = np.maximum(1, np.round(f * np.bincount(LABELS)))
        np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(subsets[1.0], np.arange(len(LABELS)))


def test_fractions_seeded():
    a = nested_fractions(LABELS, seed=3)
    b = nested_fractions(LABELS, seed=3)
    c = nested_fractions(LABELS, seed=4)
    for f in DEFAULT_FRACTIONS:
        np.testing.assert_array_equal(a[f], b[f])
    assert not np.array_equal(a[0.1], c[0.1])
    with pytest.raises(ValueError):
        nested_fractions(LABELS, fractions=[0.0, 0.5])


def test_fractions_json_round_trip_and_dataset_check(tmp_path):
    subsets = nested_fractions(LABELS, fractions=(0.05, 0.5), seed=1)
    path = tmp_path / "fractions.json"
    write_fractions(path, subsets, labels=LABELS, seed=1, dataset="toy")
    back = read_fractions(path, labels=LABELS)
    assert sorted(back) == [0.05, 0.5]
    for f in subsets:
        np.testing.assert_array_equal(back[f], subsets[f])
    other = LABELS.copy()
    other[:2] = 1
    with pytest.raises(ValueError, match="another training set"):
        read_fractions(path, labels=other)
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError):
        read_fractions(tmp_path / "bad.json")


def test_stratified_split_partitions_with_class_balance():
    parts = stratified_split(LABELS, (0.7, 0.15, 0.15), seed=0)
    joined = np.concatenate(parts)
    assert sorted(joined) == list(range(len(LABELS)))
    for part in parts:
        assert (np.bincount(LABELS[part], minlength=4) >= 1).all()
    assert abs(len(parts[0]) - 0.7 * len(LABELS)) <= 4
    again = stratified_split(LABELS, (0.7, 0.15, 0.15), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_patient_split_keeps_patients_together():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{k}" for k in range(40)], 10)
    labels = np.repeat(rng.integers(0, 2, 40), 10)
    parts = patient_split(labels, patients, (0.6, 0.2, 0.2), seed=2)
    assert sorted(np.concatenate(parts)) == list(range(400))
    groups = [set(patients[p]) for p in parts]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert all(len(np.unique(labels[p])) == 2 for p in parts)
    other = patient_split(labels, patients, (0.6, 0.2, 0.2), seed=3)
    assert set(patients[other[1]]) != groups[1]
