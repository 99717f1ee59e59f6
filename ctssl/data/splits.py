"""Seeded dataset splits: train/val/test (patient-wise when possible) and few-label fractions.

Few-label fractions are nested (each smaller subset lies inside each larger one) and
stratified, and are saved to JSON so that every pre-training method is fine-tuned on exactly
the same images.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np

from ..atomic import open_atomically

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
FRACTIONS_FORMAT = "ctssl-label-fractions"


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    out = sorted({float(f) for f in fractions})
    if not out or out[0] <= 0 or out[-1] > 1:
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    return out


def nested_fractions(
    labels: Sequence[int], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[float, np.ndarray]:
    """Sorted index arrays into ``labels`` for each fraction: nested, stratified, seeded.

    Each class is shuffled once with the seed; fraction ``f`` keeps the first
    ``max(1, round(f * n_class))`` indices of every class, so subsets are nested and no class
    disappears.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    orders = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    result = {}
    for f in _check_fractions(fractions):
        parts = [order[: max(1, int(round(f * len(order))))] for order in orders.values()]
        result[f] = np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return result


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Whole counts for ``fractions`` of ``n`` that sum to ``n``, each split non-empty when possible."""
    fractions = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    counts = np.floor(fractions * n).astype(int)
    for k in np.argsort(-(fractions * n - counts))[: n - counts.sum()]:
        counts[k] += 1
    for k in range(len(counts)):
        if counts[k] == 0 and fractions[k] > 0 and n >= len(counts):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[k] += 1
    return counts.tolist()


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices into len(fractions) parts with the class balance of the whole."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, count in enumerate(_split_counts(len(idx), fractions)):
            parts[k].extend(idx[start:start + count].tolist())
            start += count
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def patient_split(
    labels: Sequence[int], patients: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> list[np.ndarray]:
    """Split so that no patient is in two parts; patients are stratified by their majority label."""
    labels = np.asarray(labels)
    patients = np.asarray([str(p) for p in patients])
    ids, inverse = np.unique(patients, return_inverse=True)
    majority = np.array([np.bincount(labels[inverse == k]).argmax() for k in range(len(ids))])
    patient_parts = stratified_split(majority, fractions, seed)
    return [np.sort(np.flatnonzero(np.isin(inverse, part))) for part in patient_parts]


def labels_fingerprint(labels: Sequence[int]) -> str:
    """A short hash of the label sequence, to detect fractions applied to another dataset."""
    data = np.asarray(labels, dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def write_fractions(
    path: str | os.PathLike,
    subsets: Mapping[float, Sequence[int]],
    *,
    labels: Sequence[int] | None = None,
    seed: int | None = None,
    **meta,
) -> None:
    """Save few-label subsets (from ``nested_fractions``) as JSON; ``labels`` adds a fingerprint."""
    doc = {
        "format": FRACTIONS_FORMAT,
        "seed": seed,
        "n_train": len(labels) if labels is not None else None,
        "labels_sha256": labels_fingerprint(labels) if labels is not None else None,
        "meta": meta,
        "fractions": {repr(float(f)): [int(i) for i in idx] for f, idx in sorted(subsets.items())},
    }
    with open_atomically(path) as f:
        json.dump(doc, f)


def read_fractions(path: str | os.PathLike, labels: Sequence[int] | None = None) -> dict[float, np.ndarray]:
    """Load subsets saved by ``write_fractions``; with ``labels``, check they were made for them."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("format") != FRACTIONS_FORMAT:
        raise ValueError(f"{path} is not a ctssl label-fractions file")
    if labels is not None and doc.get("labels_sha256") is not None:
        if doc["n_train"] != len(labels) or doc["labels_sha256"] != labels_fingerprint(labels):
            raise ValueError(f"{path} was made for another training set ({doc['n_train']} samples)")
    return {float(k): np.asarray(v, dtype=np.int64) for k, v in doc["fractions"].items()}
