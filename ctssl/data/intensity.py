"""Turn HU slices into network inputs: intensity mode, pixel spacing, size and channels.

The paper pre-trains on "raw" slices: HU without a window, each slice min-max scaled.
Windowed modes are offered for fine-tuning and ablations. Every mode returns float32 in [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import torch

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (level, width) in HU, the usual radiology reading windows
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

IntensityMode = Union[str, Tuple[float, float]]
"""``"raw"``, a preset name, ``"window:LEVEL,WIDTH"`` or a ``(level, width)`` pair."""


def parse_intensity(mode: IntensityMode) -> tuple[float, float] | None:
    """The (level, width) window of a mode, or None for the paper's "raw" min-max mode."""
    if isinstance(mode, (tuple, list)):
        level, width = (float(v) for v in mode)
    elif isinstance(mode, str):
        key = mode.strip().lower()
        if key == "raw":
            return None
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        if key.startswith("window:"):
            try:
                level, width = (float(v) for v in key[len("window:"):].split(","))
            except ValueError:
                raise ValueError(f"custom window must look like 'window:LEVEL,WIDTH', got {mode!r}") from None
        else:
            choices = ", ".join(["raw", *WINDOW_PRESETS, "window:LEVEL,WIDTH"])
            raise ValueError(f"unknown intensity mode {mode!r}; choose one of {choices}")
    else:
        raise TypeError(f"intensity mode must be a string or (level, width), got {type(mode).__name__}")
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level, width


def minmax_scale(image: np.ndarray) -> np.ndarray:
    """Scale one slice to [0, 1] by its own min and max (a constant slice becomes zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def window_hu(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map the HU window [level - width/2, level + width/2] linearly onto [0, 1], clipping outside."""
    hu = np.asarray(hu, dtype=np.float32)
    lo = level - width / 2.0
    return np.clip((hu - np.float32(lo)) / np.float32(width), 0.0, 1.0).astype(np.float32)


def apply_intensity(hu: np.ndarray, mode: IntensityMode = "raw") -> np.ndarray:
    """HU slice to float32 in [0, 1] with the given intensity mode."""
    window = parse_intensity(mode)
    if window is None:
        return minmax_scale(hu)
    return window_hu(hu, *window)


def _as_tensor(image) -> tuple[torch.Tensor, bool]:
    import torch  # imported here: DICOM-only worker processes never need torch

    if isinstance(image, torch.Tensor):
        return image, False
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), True


def linear_resize_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """(out_size, in_size) weights of bilinear resizing along one axis (align_corners=False).

    When shrinking with ``antialias`` the triangle filter widens with the scale so every input
    pixel contributes (as torch's ``antialias=True`` and Pillow do); otherwise it is plain
    linear interpolation with edge clamping.
    """
    scale = in_size / out_size
    support = scale if (antialias and scale > 1.0) else 1.0
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inputs = np.arange(in_size, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(inputs[None, :] - centres[:, None]) / support, 0.0, None)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def resize_image(image, size: Sequence[int] | int, antialias: bool = True):
    """Bilinear resize of (H, W) or (C, H, W) to ``size`` (int = square), antialiased when shrinking.

    numpy arrays are resized with numpy (no torch import: ctssl-prepare workers stay light),
    torch tensors with ``torch.nn.functional.interpolate``; both give the same values.
    """
    out_hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if not isinstance(image, np.ndarray):
        return _resize_tensor(image, out_hw, antialias)
    image = np.asarray(image, dtype=np.float32)
    if tuple(image.shape[-2:]) == out_hw:
        return image
    rows = linear_resize_matrix(image.shape[-2], out_hw[0], antialias)
    cols = linear_resize_matrix(image.shape[-1], out_hw[1], antialias)
    return np.ascontiguousarray(np.matmul(np.matmul(rows, image), cols.T), dtype=np.float32)


def _resize_tensor(tensor, out_hw: tuple[int, int], antialias: bool):
    import torch
    import torch.nn.functional as F

    if tuple(tensor.shape[-2:]) == out_hw:
        return tensor.to(torch.float32)
    squeeze = tensor.dim() == 2
    batch = tensor.to(torch.float32).reshape(1, -1, *tensor.shape[-2:])
    down = out_hw[0] < tensor.shape[-2] or out_hw[1] < tensor.shape[-1]
    result = F.interpolate(batch, size=out_hw, mode="bilinear", align_corners=False, antialias=antialias and down)
    return result[0, 0] if squeeze else result[0]


def resample_to_spacing(
    image, spacing: Sequence[float], target_spacing: float | Sequence[float]
) -> tuple[object, tuple[float, float]]:
    """Resample (H, W) or (C, H, W) from ``spacing`` (row, col mm) to ``target_spacing`` mm.

    Returns the image and its new (row, col) spacing, which differs from the target only by the
    rounding of the output size to whole pixels.
    """
    if isinstance(target_spacing, (int, float)):
        target = (float(target_spacing), float(target_spacing))
    else:
        target = (float(target_spacing[0]), float(target_spacing[1]))
    h, w = image.shape[-2:]
    out_h = max(1, int(round(h * spacing[0] / target[0])))
    out_w = max(1, int(round(w * spacing[1] / target[1])))
    new_spacing = (spacing[0] * h / out_h, spacing[1] * w / out_w)
    return resize_image(image, (out_h, out_w)), new_spacing


def resize_shorter_and_center_crop(image, size: int):
    """Resize so the shorter side is ``size``, then centre-crop to ``size`` x ``size``."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    resized = resize_image(image, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top:top + size, left:left + size]


def to_channels(image, channels: int = 1) -> torch.Tensor:
    """(H, W) grey image to a float32 tensor (channels, H, W); grey is copied for 3 channels."""
    import torch

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    tensor, _ = _as_tensor(image)
    tensor = tensor.to(torch.float32)
    if tensor.dim() == 3:
        if tensor.shape[0] == channels:
            return tensor
        tensor = tensor.mean(0)
    return tensor.unsqueeze(0).repeat(channels, 1, 1) if channels > 1 else tensor.unsqueeze(0)


def slice_to_tensor(
    hu: np.ndarray,
    *,
    intensity: IntensityMode = "raw",
    channels: int = 1,
    size: int | None = None,
    spacing: Sequence[float] | None = None,
    target_spacing: float | None = None,
) -> torch.Tensor:
    """HU slice to a (channels, size, size) float32 tensor in [0, 1]: intensity, spacing, size."""
    image = apply_intensity(hu, intensity)
    if target_spacing is not None:
        if spacing is None:
            raise ValueError("target_spacing needs the slice's pixel spacing")
        image, _ = resample_to_spacing(image, spacing, target_spacing)
    tensor = to_channels(image, channels)
    if size is not None:
        tensor = resize_shorter_and_center_crop(tensor, size)
    return tensor.clamp_(0.0, 1.0)
