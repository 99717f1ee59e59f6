"""The unlabeled pre-training dataset: slices of a prepared store as [0, 1] tensors."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils.data import Dataset

from .intensity import IntensityMode, apply_intensity, parse_intensity, resize_shorter_and_center_crop, to_channels
from .store import SliceStore


class PretrainDataset(Dataset):
    """Slices of a prepared store for self-supervised pre-training.

    Each item is slice ``i`` with the intensity mode applied (default "raw": per-slice min-max
    of HU, as in the paper) as a float32 ``(channels, H, W)`` tensor in [0, 1]. Without a
    ``transform`` it is resized (shorter side) and centre-cropped to ``size``; with one, the
    transform receives the full-size tensor and its result is returned as is (e.g. a list of
    views). Picklable, so it works with DataLoader worker processes.
    """

    def __init__(
        self,
        root: str | os.PathLike | SliceStore,
        size: int = 224,
        channels: int = 1,
        intensity: IntensityMode = "raw",
        transform: Callable[[torch.Tensor], object] | None = None,
    ):
        parse_intensity(intensity)  # fail early on a bad mode
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.store = root if isinstance(root, SliceStore) else SliceStore(root)
        self.size = size
        self.channels = channels
        self.intensity = intensity
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        image = apply_intensity(self.store.read_hu(i), self.intensity)
        tensor = to_channels(image, self.channels)
        if self.transform is not None:
            return self.transform(tensor)
        return resize_shorter_and_center_crop(tensor, self.size).clamp_(0.0, 1.0).contiguous()
