"""Fine-tuning data: the labeled set's splits decoded once, the few-label fraction of a run, transforms.

``load_splits`` reads a CSV, class folders or a MedMNIST ``.npz``, 2-D or 3-D (``ctssl.data.labeled``), refuses
sets a classifier cannot be trained on (fewer than two classes) and notes classes with very few
images or missing from a split; ``select_fraction`` picks a run's training images from the nested
fractions file, so every method fine-tunes on the same ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import FinetuneConfig, FinetuneError

log = logging.getLogger(__name__)


def training_augmentation(kind: str, size: int, spatial_dims: int = 2):
    """``--augment``: none (the evaluation resize), flip, or crop (RandomResizedCrop 0.8-1 + flip).

    Volumes (``spatial_dims`` 3): flip mirrors each axis with probability 1/2; crop takes a random box of
    0.8-1 of each side, resized to ``size``^3, then flips.
    """
    from ..data.augment import Compose, RandomHorizontalFlip, RandomResizedCrop

    if kind not in ("none", "flip", "crop"):
        raise FinetuneError(f"--augment {kind}: unknown; choose none, flip or crop")
    if kind == "none":
        return None
    if spatial_dims == 3:
        first = _Resize(size, 3) if kind == "flip" else RandomResizedCrop3d(size, scale=(0.8, 1.0))
        return Compose([first, RandomFlip3d(0.5)])
    if kind == "flip":
        return Compose([_Resize(size), RandomHorizontalFlip(0.5)])
    return Compose([RandomResizedCrop(size, scale=(0.8, 1.0)), RandomHorizontalFlip(0.5)])


class _Resize:
    """The evaluation transform: images: shorter side to ``size`` then centre crop; volumes: trilinear to ``size``^3."""

    def __init__(self, size: int, spatial_dims: int = 2):
        self.size, self.spatial_dims = size, spatial_dims

    def __call__(self, x, generator=None):
        if self.spatial_dims == 3:
            from ..data.labeled import resize_volume

            return resize_volume(x, self.size)
        from ..data.intensity import resize_shorter_and_center_crop

        return resize_shorter_and_center_crop(x, self.size)


class RandomFlip3d:
    """Mirror a (C, D, H, W) volume along each spatial axis independently with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, generator=None):
        flips = [d for d in (-3, -2, -1) if float(torch.rand((), generator=generator)) < self.p]
        return x.flip(flips) if flips else x


class RandomResizedCrop3d:
    """A random box of ``scale`` (per side) of a (C, D, H, W) volume, resized trilinearly to ``size``^3."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.8, 1.0)):
        self.size, self.scale = size, scale

    def __call__(self, x, generator=None):
        from ..data.labeled import resize_volume

        box = []
        for n in x.shape[-3:]:
            side = max(1, round(n * (self.scale[0] + (self.scale[1] - self.scale[0])
                                     * float(torch.rand((), generator=generator)))))
            start = int(torch.randint(0, n - side + 1, (), generator=generator))
            box.append(slice(start, start + side))
        return resize_volume(x[(..., *box)], self.size)


class PreloadedImages(Dataset):
    """Decoded grey images (1, H, W) or volumes (1, D, H, W) held in memory, with an optional random transform.

    Fine-tuning reads each image once per epoch for tens of epochs, and the sweep fine-tunes
    many times on the same set: decoding PNG/DICOM once saves most of the CPU time.
    """

    def __init__(self, images: Sequence[torch.Tensor], labels: np.ndarray, size: int, transform=None,
                 spatial_dims: int = 2):
        self.images, self.labels, self.size, self.transform = list(images), np.asarray(labels), size, transform
        self.spatial_dims = spatial_dims

    @classmethod
    def from_dataset(cls, ds, size: int, transform=None) -> "PreloadedImages":
        """Every image of ``ds`` decoded; ValueError naming the first file that cannot be read."""
        from ..data.intensity import to_channels

        dims = getattr(ds, "spatial_dims", 2)
        images = []
        for i in range(len(ds)):
            try:
                image = ds.image(i)
                images.append(torch.as_tensor(image, dtype=torch.float32).unsqueeze(0) if dims == 3
                              else to_channels(image, 1))
            except Exception as exc:  # a damaged PNG / DICOM: name it instead of a decoder traceback
                name = ds.samples[i] if isinstance(ds.samples, list) else f"image {i}"
                raise ValueError(f"cannot read {name} ({type(exc).__name__}: {exc})") from None
        return cls(images, ds.labels, size, transform, dims)

    def with_transform(self, indices=None, transform=None) -> "PreloadedImages":
        idx = range(len(self.images)) if indices is None else [int(i) for i in indices]
        return PreloadedImages([self.images[i] for i in idx], self.labels[list(idx)], self.size, transform,
                               self.spatial_dims)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        x = self.transform(x) if self.transform is not None else _Resize(self.size, self.spatial_dims)(x)
        return x.clamp(0.0, 1.0).contiguous(), int(self.labels[i])


@dataclass
class LabeledSplits:
    """The three splits of a labeled set, decoded once; ``train`` is the full training split."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list
    train_labels: np.ndarray
    source: str
    notes: list = field(default_factory=list)
    """Warnings about the labels (classes with very few images or missing from a split), already logged."""
    spatial_dims: int = 2
    """2: images (C, H, W); 3: volumes (C, D, H, W)."""
    sample_shape: tuple = ()
    """The shape of one sample as stored (before channels and resizing), for messages."""


def _split_lists_arg(split_lists: Mapping[str, Sequence[str]]):
    return {k: list(v) for k, v in split_lists.items()} or None


def load_splits(config: FinetuneConfig) -> LabeledSplits:
    """Load ``config.data`` (CSV, class folders, MedMNIST npz) into train/val/test."""
    from ..data.labeled import load_labeled

    if not config.data:
        raise FinetuneError("no labeled data given (--data PATH: a CSV, a class-folder root or a MedMNIST .npz)")
    if not os.path.exists(config.data):
        raise FinetuneError(f"--data {config.data}: no such file or directory")
    for split, files in config.split_lists.items():
        for f in files:
            if not os.path.isfile(f):
                raise FinetuneError(f"--split-list {split}={f}: no such file")
    kwargs = dict(size=config.image_size, channels=1, intensity=config.intensity)
    path = Path(config.data)
    if path.is_dir():
        kwargs.update(split_lists=_split_lists_arg(config.split_lists), patient_regex=config.patient_regex,
                      seed=config.split_seed)
    elif path.suffix.lower() == ".csv":
        kwargs.update(seed=config.split_seed)
    try:
        splits = load_labeled(config.data, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"--data {config.data}: {exc}") from None
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise FinetuneError(f"--data {config.data}: the {name} split is empty")
    notes = check_classes(config.data, splits)
    train = splits["train"]
    preload = config.preload
    if preload not in ("auto", "yes", "no"):
        raise FinetuneError(f"--preload {preload}: choose auto, yes or no")
    if preload == "auto":
        first = train.image(0)
        total = sum(len(splits[s]) for s in splits) * first.size * 4
        preload = "yes" if total < 2 * 1024**3 else "no"
    if preload == "yes":
        try:
            parts = {s: PreloadedImages.from_dataset(splits[s], config.image_size) for s in ("train", "val", "test")}
        except (OSError, ValueError) as exc:
            raise FinetuneError(f"--data {config.data}: {exc}") from None
    else:
        parts = {s: splits[s] for s in ("train", "val", "test")}
    dims = getattr(train, "spatial_dims", 2)
    return LabeledSplits(parts["train"], parts["val"], parts["test"], list(train.classes),
                         np.asarray(train.labels), os.path.abspath(config.data), notes, dims,
                         tuple(np.shape(splits["train"].image(0))))


FEW_IMAGES = 5
"""A class with fewer images than this in the whole labeled set is named in a warning (a stray label?)."""


def check_classes(source: str, splits: Mapping[str, Dataset]) -> list[str]:
    """Refuse a set with fewer than two classes; log and return a warning for each class with fewer than
    ``FEW_IMAGES`` images or none in some split."""
    classes = [str(c) for c in splits["train"].classes]
    counts = {s: np.bincount(np.asarray(splits[s].labels, dtype=np.int64), minlength=len(classes))
              for s in ("train", "val", "test")}
    total = sum(counts.values())
    present = [c for c, n in zip(classes, total) if n > 0]
    if len(present) < 2:
        raise FinetuneError(f"--data {source}: every image has the label {present[0]!r}; a classifier needs at "
                            f"least two classes" if present else f"--data {source}: no labeled images")
    notes = []
    for k, name in enumerate(classes):
        where = f"train {counts['train'][k]}, val {counts['val'][k]}, test {counts['test'][k]}"
        missing = [s for s in ("train", "val", "test") if counts[s][k] == 0]
        if total[k] < FEW_IMAGES:
            notes.append(f"class {name!r} has only {total[k]} image(s) ({where}): a stray label? It cannot be "
                         f"learned or measured from so few")
        elif missing:
            notes.append(f"class {name!r} has no images in the {' and '.join(missing)} split ({where})")
    for note in notes:
        log.warning("--data %s: %s", source, note)
    return notes


def positive_index(config: FinetuneConfig, classes: Sequence[str]) -> int:
    """Index of the positive class of a binary task (precision, recall, F1, AUC are of that class)."""
    if config.positive_class is None:
        return 1
    if len(classes) != 2:
        raise FinetuneError(f"--positive-class is for binary tasks; this one has {len(classes)} classes")
    names = [str(c) for c in classes]
    if str(config.positive_class) in names:
        return names.index(str(config.positive_class))
    if str(config.positive_class) in ("0", "1"):
        return int(config.positive_class)
    raise FinetuneError(f"--positive-class {config.positive_class}: not a class of this set ({', '.join(names)})")


def train_view(train: Dataset, indices: np.ndarray, transform) -> Dataset:
    if isinstance(train, PreloadedImages):
        return train.with_transform(indices, transform)
    return train.subset(indices, transform=transform)


def select_fraction(config: FinetuneConfig, train_labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Indices of the training images for ``config.fraction`` (all of them without one)."""
    from ..data.splits import nested_fractions, read_fractions

    n = len(train_labels)
    if config.fraction is None:
        return 1.0, np.arange(n)
    f = float(config.fraction)
    if not 0.0 < f <= 1.0:
        raise FinetuneError(f"--fraction {config.fraction}: must lie in (0, 1]")
    if config.fractions_file is None:
        if math.isclose(f, 1.0):
            return 1.0, np.arange(n)
        return f, nested_fractions(train_labels, [f], seed=config.fraction_seed)[f]
    if not os.path.isfile(config.fractions_file):
        raise FinetuneError(f"--fractions-file {config.fractions_file}: no such file")
    try:
        subsets = read_fractions(config.fractions_file, labels=train_labels)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise FinetuneError(f"--fractions-file {config.fractions_file}: {exc}") from None
    for key, idx in subsets.items():
        if math.isclose(key, f, rel_tol=0, abs_tol=1e-9):
            return key, np.asarray(idx, dtype=np.int64)
    if math.isclose(f, 1.0):
        return 1.0, np.arange(n)
    raise FinetuneError(f"--fraction {config.fraction} is not in {config.fractions_file}; "
                        f"it holds {', '.join(f'{k:g}' for k in sorted(subsets))}")


def recalibration_view(train: Dataset, indices: np.ndarray, count: int, seed: int) -> Dataset:
    """``count`` of the run's training images, fixed for the run, with the evaluation transform."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(indices, size=min(count, len(indices)), replace=False))
    return train_view(train, chosen, None)


def indices_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
