"""3-D pre-training data: each series of a prepared store as one volume, random ``crop^3`` crops of it.

A store keeps every series as its slices sorted along the slice normal, with their positions
and in-plane pixel spacing (``index.jsonl``), so a series is a volume once its slice spacing is
known: the median gap between neighbouring positions (the series' slice thickness when the files
had no positions). ``VolumeDataset`` resamples each series once to an isotropic spacing
(default 1.5 mm; separable antialiased linear resampling, the rule of ``resize_image``), pads it
with air (-1000 HU) to at least the crop size, applies the intensity mode of the 2-D data
("raw": min-max over the whole volume, or an HU window), keeps the last few volumes per worker
process, and returns random crops as ``(channels, crop, crop, crop)`` tensors in [0, 1].
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .dicom import AIR_HU
from .intensity import IntensityMode, apply_intensity, linear_resize_matrix, parse_intensity
from .store import SliceStore

log = logging.getLogger(__name__)

DEFAULT_SPACING_MM = 1.5
"""Isotropic voxel spacing the volumes are resampled to unless told otherwise."""


@dataclass(frozen=True)
class SeriesGeometry:
    """Where one store series lies: its index in ``SliceStore.series`` and its (slice, row, column) spacing."""

    series: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def series_geometry(entry: dict, series: int = 0) -> SeriesGeometry:
    """The geometry of one ``index.jsonl`` entry; ValueError saying what is missing when it has none."""
    name = entry.get("series", "?")
    if not entry.get("spacing"):
        raise ValueError(f"series {name} has no pixel spacing")
    rows, cols = (float(v) for v in entry["spacing"])
    positions = entry.get("positions") or []
    known = [p for p in positions if p is not None]
    gaps = np.abs(np.diff(np.asarray(known, dtype=np.float64))) if len(known) == len(positions) else np.zeros(0)
    gaps = gaps[gaps > 0]
    if gaps.size:
        step = float(np.median(gaps))
    elif entry.get("thickness"):
        step = float(entry["thickness"])
    else:
        raise ValueError(f"series {name} has neither slice positions nor a slice thickness")
    shape = (len(positions), *(int(v) for v in entry["shape"]))
    return SeriesGeometry(series, shape, (step, rows, cols))


def resample_volume(volume: np.ndarray, spacing: Sequence[float],
                    target: float | Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``(D, H, W)`` from ``spacing`` (mm per axis) to ``target`` mm (isotropic for a number).

    Linear along each axis, antialiased where it shrinks (``linear_resize_matrix``); shrinking axes
    go first so the work stays small. Returns float32 and the new spacing, which differs from the
    target only by rounding the sizes to whole voxels.
    """
    targets = (float(target),) * 3 if isinstance(target, (int, float)) else tuple(float(t) for t in target)
    out = np.asarray(volume, dtype=np.float32)
    sizes = [max(1, int(round(n * s / t))) for n, s, t in zip(out.shape, spacing, targets)]
    for axis in sorted(range(3), key=lambda a: sizes[a] / out.shape[a]):
        if sizes[axis] == out.shape[axis]:
            continue
        weights = linear_resize_matrix(out.shape[axis], sizes[axis])
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    new_spacing = tuple(float(s * n / m) for s, n, m in zip(spacing, volume.shape, sizes))
    return np.ascontiguousarray(out, dtype=np.float32), new_spacing


def pad_to(volume: np.ndarray, size: int, value: float = AIR_HU) -> np.ndarray:
    """Pad every axis shorter than ``size`` on both sides (centred) with ``value``."""
    pads = [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in volume.shape]
    if not any(a or b for a, b in pads):
        return volume
    return np.pad(volume, pads, mode="constant", constant_values=value)


class VolumeDataset(Dataset):
    """Random ``crop^3`` crops of the series of a prepared store, for 3-D pre-training.

    Item ``i`` is a crop of usable series ``i // crops_per_volume`` at a random position (drawn from
    torch's global RNG, which the trainer seeds per item): a float32 ``(channels, crop, crop, crop)``
    tensor in [0, 1], or ``transform``'s result of it. Series without geometry (no pixel spacing, or
    neither positions nor thickness) are left out with a warning. Picklable: each DataLoader worker
    keeps its own cache of the last ``cache_volumes`` resampled volumes.
    """

    def __init__(self, root: str | os.PathLike | SliceStore, crop: int = 64, spacing: float = DEFAULT_SPACING_MM,
                 channels: int = 1, intensity: IntensityMode = "raw",
                 transform: Callable[[torch.Tensor], object] | None = None, crops_per_volume: int = 16,
                 cache_volumes: int = 2):
        parse_intensity(intensity)  # fail early on a bad mode
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if crop < 1 or crops_per_volume < 1 or cache_volumes < 1:
            raise ValueError(f"crop, crops_per_volume and cache_volumes must be >= 1, got {crop}, "
                             f"{crops_per_volume}, {cache_volumes}")
        if spacing <= 0:
            raise ValueError(f"volume spacing must be positive, got {spacing}")
        self.store = root if isinstance(root, SliceStore) else SliceStore(root)
        self.geometries: list[SeriesGeometry] = []
        for s, entry in enumerate(self.store.series):
            try:
                self.geometries.append(series_geometry(entry, s))
            except ValueError as exc:
                log.warning("%s: left out of the volumes (%s)", self.store.root, exc)
        if not self.geometries:
            raise ValueError(f"{self.store.root} holds no series with a known geometry (pixel spacing and slice "
                             f"positions or thickness): nothing to cut volumes from")
        self.crop, self.spacing, self.channels = int(crop), float(spacing), channels
        self.intensity, self.transform = intensity, transform
        self.crops_per_volume, self.cache_volumes = int(crops_per_volume), int(cache_volumes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.geometries) * self.crops_per_volume

    def volume(self, k: int) -> np.ndarray:
        """Usable series ``k`` resampled, padded with air to at least the crop size, in [0, 1] (cached)."""
        cached = self._cache.get(k)
        if cached is not None:
            self._cache.move_to_end(k)
            return cached
        geometry = self.geometries[k]
        hu, _ = resample_volume(self.store.read_series_hu(geometry.series), geometry.spacing, self.spacing)
        volume = apply_intensity(pad_to(hu, self.crop), self.intensity)
        self._cache[k] = volume
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return volume

    def random_crop(self, k: int) -> torch.Tensor:
        """A ``(1, crop, crop, crop)`` crop of volume ``k`` at a uniformly random position."""
        volume = self.volume(k)
        c = self.crop
        start = [int(torch.randint(0, n - c + 1, ())) for n in volume.shape]
        crop = volume[start[0]:start[0] + c, start[1]:start[1] + c, start[2]:start[2] + c]
        return torch.from_numpy(np.ascontiguousarray(crop))[None]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} volume crops")
        tensor = self.random_crop(i // self.crops_per_volume)
        if self.channels > 1:
            tensor = tensor.expand(self.channels, -1, -1, -1).contiguous()
        if self.transform is not None:
            return self.transform(tensor)
        return tensor
