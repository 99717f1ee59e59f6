"""CT augmentations as torch ops on (C, H, W) float tensors in [0, 1], and method pipelines.

Every transform is called as ``t(x, generator=None)``. Without a generator torch's global RNG is
used, which DataLoader seeds differently in each worker; a generator stored in a transform
would be copied into every worker and repeat the same augmentations, so pass generators per
call (as the tests do for determinism) rather than at construction.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Pair = tuple[float, float]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return p > 0 and float(torch.rand((), generator=generator)) < p


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=down)[0]


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_box(
    height: int, width: int, scale: Pair, ratio: Pair, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    # fall back to the largest centred crop inside the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    x: torch.Tensor,
    size: int | Sequence[int],
    scale: Pair = (0.08, 1.0),
    ratio: Pair = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random area fraction ``scale`` with aspect ``ratio``, resize to ``size`` (bilinear)."""
    top, left, h, w = crop_box(x.shape[-2], x.shape[-1], scale, ratio, generator)
    return _resize(x[..., top:top + h, left:left + w], _as_size(size))


def rotate(x: torch.Tensor, degrees: float, fill: float | None = None) -> torch.Tensor:
    """Rotate about the centre by ``degrees``, counter-clockwise as displayed (bilinear).

    Corners that come from outside the image get ``fill`` (default: the image minimum, i.e. air).
    """
    if degrees == 0:
        return x
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    h, w = x.shape[-2:]
    # rotation in pixel units, expressed in normalised grid coordinates
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype)[None]
    grid = F.affine_grid(theta, [1, x.shape[0], h, w], align_corners=False)
    ones = torch.ones_like(x[:1])
    sampled = F.grid_sample(torch.cat([x, ones])[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0]
    image, valid = sampled[:-1], sampled[-1:]
    fill_value = x.amin() if fill is None else torch.tensor(fill, dtype=x.dtype)
    return image + (1.0 - valid) * fill_value


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma))) if radius is None else radius
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding."""
    if sigma <= 0:
        return x
    c = x.shape[0]
    r = min(max(1, int(math.ceil(3.0 * sigma))), x.shape[-1] - 1, x.shape[-2] - 1)
    k = gaussian_kernel1d(sigma, radius=r, dtype=x.dtype)
    y = F.pad(x[None], (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


def intensity_jitter(
    x: torch.Tensor, brightness: float = 0.0, contrast: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Grey-CT colour jitter: a random window shift (brightness) and width change (contrast)."""
    y = x
    if contrast > 0:
        factor = _uniform(max(0.0, 1 - contrast), 1 + contrast, generator)
        mean = y.mean()
        y = (y - mean) * factor + mean
    if brightness > 0:
        y = y + _uniform(-brightness, brightness, generator) * 0.5
    return y.clamp(0.0, 1.0)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std^2) noise, clamped to [0, 1] (scanner noise on normalised intensities)."""
    if std <= 0:
        return x
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


class Compose:
    """Apply transforms in order, passing the generator on."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomResizedCrop:
    def __init__(self, size: int | Sequence[int], scale: Pair = (0.08, 1.0), ratio: Pair = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = _as_size(size), tuple(scale), tuple(ratio)

    def __call__(self, x, generator=None):
        return random_resized_crop(x, self.size, self.scale, self.ratio, generator)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, generator=None):
        return x.flip(-1) if _coin(self.p, generator) else x


class RandomVerticalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, generator=None):
        return x.flip(-2) if _coin(self.p, generator) else x


class RandomRotation:
    """Rotate by an angle uniform in [-degrees, degrees] with probability ``p``."""

    def __init__(self, degrees: float = 10.0, p: float = 1.0, fill: float | None = None):
        self.degrees, self.p, self.fill = degrees, p, fill

    def __call__(self, x, generator=None):
        if not _coin(self.p, generator):
            return x
        return rotate(x, _uniform(-self.degrees, self.degrees, generator), self.fill)


class IntensityJitter:
    """Brightness/contrast jitter of grey CT (a random HU-window shift and width) with probability ``p``."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, p: float = 0.8):
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def __call__(self, x, generator=None):
        if not _coin(self.p, generator):
            return x
        return intensity_jitter(x, self.brightness, self.contrast, generator)


class GaussianBlur:
    """Blur with sigma uniform in ``sigma`` (pixels) with probability ``p``."""

    def __init__(self, sigma: Pair = (0.1, 2.0), p: float = 0.5):
        self.sigma, self.p = tuple(sigma), p

    def __call__(self, x, generator=None):
        if not _coin(self.p, generator):
            return x
        return gaussian_blur(x, _uniform(self.sigma[0], self.sigma[1], generator))


class GaussianNoise:
    """Add Gaussian noise with std uniform in [0, ``std``] with probability ``p``."""

    def __init__(self, std: float = 0.03, p: float = 0.5):
        self.std, self.p = std, p

    def __call__(self, x, generator=None):
        if not _coin(self.p, generator):
            return x
        return gaussian_noise(x, _uniform(0.0, self.std, generator), generator)


class SparkTransform:
    """SparK's augmentation: RandomResizedCrop(size, scale=(0.67, 1)) + horizontal flip. One tensor."""

    def __init__(self, size: int = 224, scale: Pair = (0.67, 1.0), ratio: Pair = (3 / 4, 4 / 3), hflip: float = 0.5):
        self.pipeline = Compose([RandomResizedCrop(size, scale, ratio), RandomHorizontalFlip(hflip)])

    def __call__(self, x, generator=None) -> torch.Tensor:
        return self.pipeline(x, generator=generator)


def contrastive_view(
    size: int = 224,
    scale: Pair = (0.2, 1.0),
    jitter: float = 0.4,
    jitter_p: float = 0.8,
    blur_p: float = 0.5,
    blur_sigma: Pair = (0.1, 2.0),
    rotation: float = 10.0,
    rotation_p: float = 0.5,
    hflip: float = 0.5,
    vflip: float = 0.5,
    noise_std: float = 0.0,
    noise_p: float = 0.0,
) -> Compose:
    """One MoCo-v2-style view for grey CT: crop, both flips, rotation, jitter, blur (noise optional)."""
    return Compose([
        RandomResizedCrop(size, scale),
        RandomHorizontalFlip(hflip),
        RandomVerticalFlip(vflip),
        RandomRotation(rotation, rotation_p),
        IntensityJitter(jitter, jitter, jitter_p),
        GaussianBlur(blur_sigma, blur_p),
        GaussianNoise(noise_std, noise_p),
    ])


class TwoViewTransform:
    """Two independently augmented views (SimCLR / MoCo v2 / BYOL); returns ``[view1, view2]``.

    ``blur_p`` may be a pair to make the views asymmetric as BYOL does (e.g. ``(1.0, 0.1)``).
    """

    def __init__(self, size: int = 224, scale: Pair = (0.2, 1.0), blur_p: float | Pair = 0.5, **view_kwargs):
        blur = (blur_p, blur_p) if isinstance(blur_p, (int, float)) else tuple(blur_p)
        self.views = [contrastive_view(size, scale, blur_p=b, **view_kwargs) for b in blur]

    def __call__(self, x, generator=None) -> list[torch.Tensor]:
        return [view(x, generator=generator) for view in self.views]


class MultiCropTransform:
    """SwAV multi-crop: ``n_global`` crops at ``global_size`` then ``n_local`` at ``local_size``.

    Defaults follow the paper notes: 2 x 224 (scale 0.9-1) + 6 x 96 (scale 0.1-0.33).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 6,
        global_scale: Pair = (0.9, 1.0),
        local_scale: Pair = (0.1, 0.33),
        **view_kwargs,
    ):
        self.global_view = contrastive_view(global_size, global_scale, **view_kwargs)
        self.local_view = contrastive_view(local_size, local_scale, **view_kwargs)
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, x, generator=None) -> list[torch.Tensor]:
        views = [self.global_view(x, generator=generator) for _ in range(self.n_global)]
        return views + [self.local_view(x, generator=generator) for _ in range(self.n_local)]


# ---------------------------------------------------------------------------------------------
# volumes: (C, D, H, W) crops of a resampled CT series, in [0, 1]
# ---------------------------------------------------------------------------------------------

Triple = tuple[int, int, int]


def _as_size3(size: int | Sequence[int]) -> Triple:
    return (int(size),) * 3 if isinstance(size, int) else (int(size[0]), int(size[1]), int(size[2]))


def crop_box_3d(shape: Sequence[int], scale: Pair, ratio: Pair,
                generator: torch.Generator | None = None) -> tuple[Triple, Triple]:
    """(start, size) per axis of a random box covering ``scale`` of the volume, its sides' ratios to the
    cube of that volume each in ``ratio``.

    The 3-D form of ``crop_box``: a target volume fraction, three log-uniform side factors normalised
    to a product of 1, ten tries, then the whole volume.
    """
    shape = tuple(int(s) for s in shape)
    volume = math.prod(shape)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        side = (volume * _uniform(scale[0], scale[1], generator)) ** (1.0 / 3.0)
        logs = [_uniform(log_ratio[0], log_ratio[1], generator) for _ in range(3)]
        mean = sum(logs) / 3.0
        size = tuple(int(round(side * math.exp(v - mean))) for v in logs)
        if all(0 < s <= n for s, n in zip(size, shape)):
            start = tuple(int(torch.randint(0, n - s + 1, (), generator=generator)) for s, n in zip(size, shape))
            return start, size
    return (0, 0, 0), shape


def _resize3d(x: torch.Tensor, size: Triple) -> torch.Tensor:
    if tuple(x.shape[-3:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]


def random_resized_crop_3d(x: torch.Tensor, size: int | Sequence[int], scale: Pair = (0.08, 1.0),
                           ratio: Pair = (3 / 4, 4 / 3), generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a random box (volume fraction ``scale``) of ``x`` ``(C, D, H, W)``, resize to ``size`` (trilinear)."""
    start, box = crop_box_3d(x.shape[-3:], scale, ratio, generator)
    (d, h, w), (bd, bh, bw) = start, box
    return _resize3d(x[..., d:d + bd, h:h + bh, w:w + bw], _as_size3(size))


class RandomResizedCrop3d:
    def __init__(self, size: int | Sequence[int], scale: Pair = (0.08, 1.0), ratio: Pair = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = _as_size3(size), tuple(scale), tuple(ratio)

    def __call__(self, x, generator=None):
        return random_resized_crop_3d(x, self.size, self.scale, self.ratio, generator)

    def __repr__(self) -> str:
        return f"RandomResizedCrop3d({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomFlip3d:
    """Flip each of the depth, height and width axes independently with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, generator=None):
        axes = [axis for axis in (-3, -2, -1) if _coin(self.p, generator)]
        return x.flip(axes) if axes else x


class SparkTransform3d:
    """SparK's augmentation of a volume crop: RandomResizedCrop3d(size, scale=(0.67, 1)) + flips of all three axes."""

    def __init__(self, size: int = 64, scale: Pair = (0.67, 1.0), ratio: Pair = (3 / 4, 4 / 3), flip: float = 0.5):
        self.pipeline = Compose([RandomResizedCrop3d(size, scale, ratio), RandomFlip3d(flip)])

    def __call__(self, x, generator=None) -> torch.Tensor:
        return self.pipeline(x, generator=generator)


def contrastive_view_3d(size: int = 64, scale: Pair = (0.2, 1.0), jitter: float = 0.4, jitter_p: float = 0.8,
                        flip: float = 0.5, noise_std: float = 0.03, noise_p: float = 0.5) -> Compose:
    """One view of a volume crop: random resized 3-D crop, flips of all three axes, brightness/contrast jitter,
    Gaussian noise. Kept simple on purpose: no rotation and no blur in 3-D."""
    return Compose([
        RandomResizedCrop3d(size, scale),
        RandomFlip3d(flip),
        IntensityJitter(jitter, jitter, jitter_p),
        GaussianNoise(noise_std, noise_p),
    ])


class TwoViewTransform3d:
    """Two independently augmented views of one volume crop (SimCLR / MoCo v2 / BYOL in 3-D)."""

    def __init__(self, size: int = 64, scale: Pair = (0.2, 1.0), **view_kwargs):
        self.views = [contrastive_view_3d(size, scale, **view_kwargs) for _ in range(2)]

    def __call__(self, x, generator=None) -> list[torch.Tensor]:
        return [view(x, generator=generator) for view in self.views]
