"""ctssl.train.metrics against scikit-learn on fixed, random and tied predictions."""

import math

import numpy as np
import pytest

from ctssl.train import metrics as M

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn (test dependency) is not installed")


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_against_sklearn(y, probs):
    k = probs.shape[1]
    pred = probs.argmax(1)
    got = M.classification_metrics(y, probs)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    avg = "binary" if k == 2 else "macro"
    assert got["precision"] == pytest.approx(sk.precision_score(y, pred, average=avg, zero_division=0))
    assert got["recall"] == pytest.approx(sk.recall_score(y, pred, average=avg, zero_division=0))
    assert got["f1"] == pytest.approx(sk.f1_score(y, pred, average=avg, zero_division=0))
    if k == 2:
        want_auc = sk.roc_auc_score(y, probs[:, 1])
    else:
        want_auc = sk.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k)))
    assert got["auc"] == pytest.approx(want_auc)
    assert got["confusion_matrix"] == sk.confusion_matrix(y, pred, labels=list(range(k))).tolist()
    assert got["n"] == len(y)


def test_fixed_binary_example():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2])
    probs = np.stack([1 - p1, p1], 1)
    got = M.classification_metrics(y, probs)
    # predictions 0 1 1 0 1 0: tp=2 fp=1 fn=1
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["confusion_matrix"] == [[2, 1], [1, 2]]
    # positive/negative pairs ranked correctly: 8 of 9
    assert got["auc"] == pytest.approx(8 / 9)
    _check_against_sklearn(y, probs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 11])
def test_random_predictions(seed, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present (sklearn's OvR AUC requires it)
    probs = _softmax(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1)))
    _check_against_sklearn(y, probs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 4])
def test_tied_scores(seed, k):
    """Scores quantised to a few values: many ties, AUC must count them as sklearn does."""
    rng = np.random.default_rng(100 + seed)
    n = 60
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    raw = np.round(rng.random((n, k)) * 3) + 0.01
    probs = raw / raw.sum(1, keepdims=True)
    _check_against_sklearn(y, probs)


def test_all_scores_equal_gives_half():
    y = np.array([0, 1, 0, 1, 1])
    assert M.binary_auc(y, np.full(5, 0.3)) == pytest.approx(0.5)


def test_class_never_predicted_counts_as_zero_precision():
    y = np.array([0, 1, 2, 2, 1, 0])
    pred = np.array([0, 0, 2, 2, 0, 0])
    p, r, f = M.precision_recall_f1(y, pred, 3)
    assert p == pytest.approx(sk.precision_score(y, pred, average="macro", zero_division=0))
    assert r == pytest.approx(sk.recall_score(y, pred, average="macro", zero_division=0))
    assert f == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))


def test_auc_undefined_with_one_class():
    assert math.isnan(M.binary_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_multiclass_auc_skips_absent_class():
    """A class absent from y_true has no OvR AUC; the others are averaged (sklearn would refuse)."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    probs = _softmax(rng.normal(size=(40, 3)))
    want = np.mean([sk.roc_auc_score(y == c, probs[:, c]) for c in (0, 1)])
    assert M.roc_auc(y, probs) == pytest.approx(want)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="probs"):
        M.classification_metrics([0, 1], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels must lie"):
        M.confusion_matrix([0, 3], [0, 1], 2)


def test_positive_class_zero_matches_sklearn_pos_label():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 50)
    probs = _softmax(rng.normal(size=(50, 2)) + np.eye(2)[y])
    pred = probs.argmax(1)
    got = M.classification_metrics(y, probs, positive=0)
    assert got["precision"] == pytest.approx(sk.precision_score(y, pred, pos_label=0))
    assert got["recall"] == pytest.approx(sk.recall_score(y, pred, pos_label=0))
    assert got["f1"] == pytest.approx(sk.f1_score(y, pred, pos_label=0))
    assert got["auc"] == pytest.approx(sk.roc_auc_score(y == 0, probs[:, 0]))
