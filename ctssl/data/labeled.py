"""Labeled image sets for fine-tuning: a CSV of paths, class-per-folder images, MedMNIST ``.npz``.

All loaders return ``{"train": ds, "val": ds, "test": ds}`` of ``LabeledDataset``. Splits that
come with the data are kept; otherwise they are made with a seed, patient-wise when the data has
patient IDs (no patient in two splits) and stratified by class.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .intensity import IntensityMode, apply_intensity, parse_intensity, resize_shorter_and_center_crop, to_channels
from .splits import patient_split, stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}

ORGANMNIST_CLASSES = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]
"""Class names of OrganAMNIST/OrganCMNIST/OrganSMNIST (11 abdominal organs), label order."""


def _grey(array: np.ndarray) -> np.ndarray:
    """Channel-last RGB(A) or channel-first single-channel arrays to (H, W)."""
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grey or RGB image, got shape {array.shape}")
    return array


def array_to_unit(array: np.ndarray, intensity: IntensityMode = "raw", rgb_max: float | None = None) -> np.ndarray:
    """An image array to float32 (H, W) in [0, 1].

    8-bit images are divided by 255; float images already in [0, 1] are kept; anything else is
    taken as HU (e.g. int16 CT) and goes through the intensity mode.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
        return (_grey(array) / 255.0).astype(np.float32)
    array = _grey(array)
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if array.dtype == bool:
        return array.astype(np.float32)
    if rgb_max is not None:
        return np.clip(array.astype(np.float32) / rgb_max, 0.0, 1.0)
    if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return array.astype(np.float32)
    return apply_intensity(array, intensity)


def load_image(path: str | os.PathLike, intensity: IntensityMode = "raw") -> np.ndarray:
    """Read a PNG/JPEG (Pillow), ``.npy`` or DICOM file as float32 (H, W) in [0, 1]."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return array_to_unit(np.load(path, allow_pickle=False), intensity)
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                rgb_max = 65535.0 if img.mode.startswith("I;16") else None
                return array_to_unit(np.asarray(img), intensity, rgb_max=rgb_max)
            return array_to_unit(np.asarray(img.convert("L")), intensity)
    from .dicom import SliceReadError, read_slice_hu

    try:
        hu, _ = read_slice_hu(path)
    except SliceReadError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return apply_intensity(hu, intensity)


def volume_to_unit(array: np.ndarray, intensity: IntensityMode = "raw") -> np.ndarray:
    """A volume (D, H, W) to float32 in [0, 1]: 8-bit / 255, booleans and floats in [0, 1] kept, else HU."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a volume (D, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return array.astype(np.float32)
    return apply_intensity(array, intensity).astype(np.float32)


def resize_volume(volume, size: int) -> torch.Tensor:
    """(C, D, H, W) or (D, H, W) to ``size``^3 by trilinear interpolation (MedMNIST 3-D volumes are cubes)."""
    x = torch.as_tensor(volume, dtype=torch.float32)
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if tuple(x.shape[-3:]) != (size,) * 3:
        x = torch.nn.functional.interpolate(x.unsqueeze(0), size=(size,) * 3, mode="trilinear",
                                            align_corners=False)[0]
    return x[0] if squeeze else x


def is_volume_array(images: np.ndarray) -> bool:
    """MedMNIST 3-D ``(N, D, H, W)`` (or ``(N, 1, D, H, W)``), not 2-D RGB ``(N, H, W, 3)``."""
    return images.ndim == 5 or (images.ndim == 4 and images.shape[-1] not in (3, 4))


class LabeledDataset(Dataset):
    """(image, label) pairs; image a float32 (channels, size, size) tensor in [0, 1].

    ``samples`` is a list of file paths or an array of images (N, H, W[, C]), or with ``volumes`` of
    volumes (N, D, H, W), returned as (channels, size, size, size). With a ``transform`` the full-size
    (channels, H, W) or (channels, D, H, W) tensor goes to it and its result is returned in place of the
    resized sample.
    """

    def __init__(
        self,
        samples: Sequence[str] | np.ndarray,
        labels: Sequence[int],
        classes: Sequence[str] | None = None,
        patients: Sequence[str] | None = None,
        size: int = 224,
        channels: int = 1,
        intensity: IntensityMode = "raw",
        transform: Callable[[torch.Tensor], object] | None = None,
        volumes: bool = False,
    ):
        parse_intensity(intensity)
        if volumes and not isinstance(samples, np.ndarray):
            raise ValueError("volumes are read from an array (a MedMNIST 3-D .npz), not from files")
        self.volumes = volumes
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.samples = samples if isinstance(samples, np.ndarray) else [os.fspath(s) for s in samples]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.samples) != len(self.labels):
            raise ValueError(f"{len(self.samples)} samples but {len(self.labels)} labels")
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
        if n_classes > len(self.classes):
            raise ValueError(f"label {n_classes - 1} but only {len(self.classes)} class names")
        self.patients = [str(p) for p in patients] if patients is not None else None
        self.size = size
        self.channels = channels
        self.intensity = intensity
        self.transform = transform

    @property
    def spatial_dims(self) -> int:
        """2: images; 3: volumes."""
        return 3 if self.volumes else 2

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Sample ``i`` as float32 (H, W) (volumes: (D, H, W)) in [0, 1], before channels, size and transform."""
        if self.volumes:
            return volume_to_unit(self.samples[i], self.intensity)
        if isinstance(self.samples, np.ndarray):
            return array_to_unit(self.samples[i], self.intensity)
        return load_image(self.samples[i], self.intensity)

    def __getitem__(self, i: int):
        if self.volumes:
            tensor = torch.from_numpy(self.image(i)).unsqueeze(0).expand(self.channels, -1, -1, -1)
            if self.transform is not None:
                return self.transform(tensor), int(self.labels[i])
            return resize_volume(tensor, self.size).clamp_(0.0, 1.0).contiguous(), int(self.labels[i])
        tensor = to_channels(self.image(i), self.channels)
        if self.transform is not None:
            return self.transform(tensor), int(self.labels[i])
        return resize_shorter_and_center_crop(tensor, self.size).clamp_(0.0, 1.0).contiguous(), int(self.labels[i])

    def subset(self, indices: Sequence[int], transform: Callable | None | str = "same") -> "LabeledDataset":
        """A dataset of the given samples (e.g. a few-label fraction) with the same settings."""
        indices = np.asarray(indices, dtype=np.int64)
        samples = self.samples[indices] if isinstance(self.samples, np.ndarray) else [self.samples[i] for i in indices]
        return LabeledDataset(
            samples, self.labels[indices], self.classes,
            [self.patients[i] for i in indices] if self.patients is not None else None,
            self.size, self.channels, self.intensity, self.transform if transform == "same" else transform,
            self.volumes,
        )

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def _encode_labels(raw: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels stay as they are (classes "0".."K-1"); names are sorted into classes."""
    raw = [str(v).strip() for v in raw]
    try:
        ints = [int(v) for v in raw]
    except ValueError:
        classes = sorted(set(raw))
        lookup = {c: k for k, c in enumerate(classes)}
        return np.array([lookup[v] for v in raw], dtype=np.int64), classes
    if ints and min(ints) < 0:
        raise ValueError("integer labels must be >= 0")
    return np.asarray(ints, dtype=np.int64), [str(i) for i in range(max(ints) + 1 if ints else 0)]


def _make_splits(
    labels: np.ndarray, patients: Sequence[str] | None, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    if patients is not None:
        return patient_split(labels, patients, fractions, seed)
    return stratified_split(labels, fractions, seed)


def _build(
    samples, labels, classes, patients, parts: Mapping[str, np.ndarray], kwargs: dict,
    train_transform=None, eval_transform=None,
) -> dict[str, LabeledDataset]:
    out = {}
    for name in SPLITS:
        idx = np.asarray(parts.get(name, np.zeros(0, np.int64)), dtype=np.int64)
        split_samples = samples[idx] if isinstance(samples, np.ndarray) else [samples[i] for i in idx]
        split_patients = [patients[i] for i in idx] if patients is not None else None
        transform = train_transform if name == "train" else eval_transform
        out[name] = LabeledDataset(split_samples, labels[idx], classes, split_patients, transform=transform, **kwargs)
    return out


def _resolve_given_splits(
    names: Sequence[str | None], labels: np.ndarray, patients, fractions, seed
) -> dict[str, np.ndarray]:
    """Keep given train/val/test; carve a missing val (or test) out of train, patient-wise if possible."""
    names = np.asarray([_SPLIT_ALIASES.get((n or "").strip().lower(), "") for n in names])
    unknown = np.flatnonzero(names == "")
    if len(unknown):
        raise ValueError(f"{len(unknown)} rows have no split or an unknown split name (use train/val/test)")
    parts = {s: np.flatnonzero(names == s) for s in SPLITS}
    missing = [s for s in ("val", "test") if len(parts[s]) == 0]
    if missing and len(parts["train"]):
        train = parts["train"]
        frac = {"val": fractions[1], "test": fractions[2]}
        keep = max(fractions[0], 1e-9)
        sub = _make_splits(labels[train], [patients[i] for i in train] if patients is not None else None,
                           [keep] + [frac[s] for s in missing], seed)
        parts["train"] = train[sub[0]]
        for s, part in zip(missing, sub[1:]):
            parts[s] = train[part]
            log.info("no %s split given; made one of %d samples from train", s, len(part))
    return parts


def load_csv(
    csv_path: str | os.PathLike,
    *,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    train_transform=None,
    eval_transform=None,
    **dataset_kwargs,
) -> dict[str, LabeledDataset]:
    """A CSV with columns ``path,label`` and optional ``patient`` and ``split`` (train/val/test).

    Paths are relative to the CSV's folder. Labels are class indices or class names.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    header = {k.strip().lower(): k for k in rows[0].keys() if k}
    for needed in ("path", "label"):
        if needed not in header:
            raise ValueError(f"{csv_path} needs a '{needed}' column; it has {list(rows[0].keys())}")
    samples = [str((csv_path.parent / r[header["path"]].strip()).resolve()) for r in rows]
    raw_labels = [(r[header["label"]] or "") for r in rows]
    empty = [k for k, v in enumerate(raw_labels) if not v.strip()]
    if empty:  # csv line k + 2: the header is line 1
        raise ValueError(f"{csv_path}: {len(empty)} row(s) have an empty label (first: line {empty[0] + 2}, "
                         f"{rows[empty[0]][header['path']]})")
    missing = [r[header["path"]] for r, s in zip(rows, samples) if not os.path.isfile(s)]
    if missing:
        raise ValueError(f"{csv_path}: {len(missing)} image(s) listed do not exist (paths are relative to the "
                         f"CSV's folder): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if classes is not None:
        lookup = {c: k for k, c in enumerate(classes)}
        labels = np.array([lookup[v.strip()] if v.strip() in lookup else int(v) for v in raw_labels], dtype=np.int64)
    else:
        labels, classes = _encode_labels(raw_labels)
    patients = [r[header["patient"]].strip() for r in rows] if "patient" in header else None
    if "split" in header:
        parts = _resolve_given_splits([r[header["split"]] for r in rows], labels, patients, split_fractions, seed)
    else:
        parts = dict(zip(SPLITS, _make_splits(labels, patients, split_fractions, seed)))
    return _build(samples, labels, classes, patients, parts, dataset_kwargs, train_transform, eval_transform)


def _list_class_folder(root: Path) -> tuple[list[str], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return classes, [
        str(p) for c in classes for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS + (".npy", ".dcm")
    ]


def _read_split_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> set[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names = set()
    for p in paths:
        with open(p, encoding="utf-8") as f:
            names.update(line.strip() for line in f if line.strip())
    return names


def load_image_folder(
    root: str | os.PathLike,
    *,
    split_lists: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
    patient_regex: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    train_transform=None,
    eval_transform=None,
    **dataset_kwargs,
) -> dict[str, LabeledDataset]:
    """Class-per-folder images (``root/<class>/*.png``, the COVID-CT layout).

    Splits come from ``root/{train,val,test}/<class>/`` when those folders exist, else from
    ``split_lists`` (split name -> text file(s) listing file names, one per line, like the
    COVID-CT ``Data-split`` files), else they are made with the seed. ``patient_regex``'s first
    group, searched in each file name, gives patient IDs for patient-wise splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    split_dirs = [s for s in ("train", "val", "valid", "test") if (root / s).is_dir()]
    given: list[str | None] | None = None
    if split_dirs:
        per_split = {s: _list_class_folder(root / s) for s in split_dirs}
        classes = sorted({c for cs, _ in per_split.values() for c in cs})
        samples, given = [], []
        for s, (_, files) in per_split.items():
            samples.extend(files)
            given.extend([s] * len(files))
    else:
        classes, samples = _list_class_folder(root)
    if not samples:
        raise ValueError(f"no images found in class folders under {root}")
    class_of = {c: k for k, c in enumerate(classes)}
    class_part = 1 if split_dirs else 0
    labels = np.array([class_of[Path(p).relative_to(root).parts[class_part]] for p in samples], dtype=np.int64)
    patients = None
    if patient_regex is not None:
        pattern = re.compile(patient_regex)
        patients = []
        for p in samples:
            m = pattern.search(Path(p).name)
            if m is None:
                raise ValueError(f"patient_regex {patient_regex!r} does not match {Path(p).name}")
            patients.append(m.group(1) if m.groups() else m.group(0))
    if split_lists is not None and given is None:
        lists = {_SPLIT_ALIASES[k.lower()]: _read_split_list(v) for k, v in split_lists.items()}
        given = []
        for p in samples:
            rel = Path(p).relative_to(root).as_posix()
            name = Path(p).name
            hits = [s for s, names in lists.items() if name in names or rel in names]
            given.append(hits[0] if hits else None)
        keep = [i for i, g in enumerate(given) if g is not None]
        if len(keep) < len(samples):
            log.info("%d images are in no split list and are left out", len(samples) - len(keep))
        samples = [samples[i] for i in keep]
        labels = labels[keep]
        given = [given[i] for i in keep]
        patients = [patients[i] for i in keep] if patients is not None else None
    if given is not None:
        parts = _resolve_given_splits(given, labels, patients, split_fractions, seed)
    else:
        parts = dict(zip(SPLITS, _make_splits(labels, patients, split_fractions, seed)))
    return _build(samples, labels, classes, patients, parts, dataset_kwargs, train_transform, eval_transform)


def load_medmnist(
    npz_path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    train_transform=None,
    eval_transform=None,
    **dataset_kwargs,
) -> dict[str, LabeledDataset]:
    """A MedMNIST ``.npz`` (``train_images``/``train_labels``, ``val_*``, ``test_*``), splits as given.

    2-D sets hold images (N, H, W[, 3]); 3-D sets (OrganMNIST3D, NoduleMNIST3D, ...) volumes (N, D, H, W),
    told apart by the arrays' dimensions. Organ{A,C,S}MNIST files get their organ names as classes.
    """
    npz_path = Path(npz_path)
    with np.load(npz_path, allow_pickle=False) as data:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in data.files]
        if missing:
            raise ValueError(f"{npz_path} is not a MedMNIST file: missing {missing}")
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"].reshape(len(data[f"{s}_labels"]), -1)) for s in SPLITS}
    volumes = {s: is_volume_array(x) for s, (x, _) in arrays.items()}
    if len(set(volumes.values())) > 1:
        shapes = ", ".join(f"{s}_images {arrays[s][0].shape}" for s in SPLITS)
        raise ValueError(f"{npz_path} mixes images and volumes ({shapes})")
    volumes = volumes["train"]
    for s, (_, y) in arrays.items():
        if y.shape[1] != 1:
            raise ValueError(f"{npz_path}: {s}_labels has {y.shape[1]} columns; multi-label sets are not supported")
    n_classes = int(max(y.max() for _, y in arrays.values() if len(y))) + 1
    if classes is None:
        classes = ORGANMNIST_CLASSES if npz_path.name.lower().startswith("organ") and n_classes <= 11 else [
            str(i) for i in range(n_classes)
        ]
    out = {}
    for s, (x, y) in arrays.items():
        transform = train_transform if s == "train" else eval_transform
        out[s] = LabeledDataset(x, y[:, 0], classes, None, transform=transform, volumes=volumes, **dataset_kwargs)
    return out


def load_labeled(source: str | os.PathLike, **kwargs) -> dict[str, LabeledDataset]:
    """Pick the loader by what ``source`` is: ``.csv``, MedMNIST ``.npz``, or a class-folder root."""
    source = Path(source)
    if source.is_dir():
        return load_image_folder(source, **kwargs)
    if source.suffix.lower() == ".csv":
        return load_csv(source, **kwargs)
    if source.suffix.lower() == ".npz":
        return load_medmnist(source, **kwargs)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    raise ValueError(f"cannot tell how to load {source}: expected a .csv, a MedMNIST .npz, or a folder")
