"""Classification metrics for the few-label study, in numpy (scikit-learn is only a test dependency).

Conventions follow scikit-learn's defaults so numbers are comparable with published work:
- binary tasks (2 classes): precision, recall and F1 of the positive class (1 unless given); AUC
  from the positive class's score;
- multi-class: precision, recall and F1 are macro averages over the classes that occur in the
  true or the predicted labels; AUC is the macro average of one-vs-rest AUCs;
- a ratio with a zero denominator (a class never predicted) counts as 0;
- AUC counts tied scores as half (the trapezoidal ROC area, as ``roc_auc_score``); it is NaN
  when it is undefined (only one class in ``y_true``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "balanced_accuracy", "auc", "f1", "precision", "recall")
"""Scalar metrics written by ``classification_metrics`` (and summarised by the report)."""


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> np.ndarray:
    """(K, K) counts; row = true class, column = predicted class."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if not len(y_true):
        return math.nan
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None, positive: int = 1
) -> tuple[float, float, float]:
    """(precision, recall, F1): of class ``positive`` when binary, else macro over classes seen in either array."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    seen = np.union1d(y_true, y_pred)
    n = max(int(seen.max(initial=-1)) + 1, num_classes or 0)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_ratio(tp, cm.sum(axis=0))
    recall = _safe_ratio(tp, cm.sum(axis=1))
    f1 = _safe_ratio(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))
    if (num_classes or n) <= 2:
        if positive >= n:  # the positive class occurs nowhere: sklearn's zero_division result
            return 0.0, 0.0, 0.0
        return float(precision[positive]), float(recall[positive]), float(f1[positive])
    return float(precision[seen].mean()), float(recall[seen].mean()), float(f1[seen].mean())


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank (like scipy's rankdata 'average')."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of a binary problem (True/1 positive), ties counted as 1/2; NaN with one class."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 1:
        raise ValueError(f"labels {y_true.shape} and scores {scores.shape} must be 1-D of one length")
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true: Sequence[int], probs: np.ndarray, positive: int = 1) -> float:
    """Binary AUC from ``probs[:, positive]`` or macro one-vs-rest AUC over the classes in ``y_true``.

    ``probs`` is (N, K) class probabilities (or any scores). One-vs-rest classes with no
    positive or no negative sample are left out of the average (scikit-learn refuses such input);
    NaN when no class is left.
    """
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(y_true):
        raise ValueError(f"probs must be (N, K) with N = {len(y_true)}, got {probs.shape}")
    if probs.shape[1] == 2:
        return binary_auc(y_true == positive, probs[:, positive])
    aucs = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def classification_metrics(
    y_true: Sequence[int], probs: np.ndarray, num_classes: int | None = None, positive: int = 1
) -> dict:
    """Every metric of the study from true labels and (N, K) class probabilities.

    Prediction = argmax of ``probs``; ``positive`` is the positive class of a binary task. Returns the
    scalars in ``METRIC_NAMES`` plus ``n`` and ``confusion_matrix`` (a list of rows, true class by predicted class).
    """
    y_true = _labels(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = num_classes or probs.shape[1]
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(f"probs must be ({len(y_true)}, {num_classes}), got {probs.shape}")
    y_pred = probs.argmax(axis=1) if len(y_true) else np.zeros(0, np.int64)
    if num_classes == 2 and positive not in (0, 1):
        raise ValueError(f"positive class must be 0 or 1, got {positive}")
    precision, recall, f1 = precision_recall_f1(y_true, y_pred, num_classes, positive)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "auc": roc_auc(y_true, probs, positive),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes).tolist(),
    }
