"""SparK's patch masks: which patches of each image (or volume) are visible.

A mask is a boolean tensor ``(B, h, w)`` over the patch grid of an image batch
``(B, C, h * patch, w * patch)``, or ``(B, d, h, w)`` over the grid of a volume batch
``(B, C, d * patch, h * patch, w * patch)``; True marks a visible (active) patch.
"""
from __future__ import annotations

import math

import torch

PATCH_SIZE = 32
"""SparK's patch side: the encoder's total downsampling ratio (32 for ResNets)."""


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """SparK's rule: every image keeps exactly ``round(L * (1 - ratio))`` patches."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return round(num_patches * (1.0 - mask_ratio))


def random_patch_mask(
    batch_size: int,
    grid: tuple[int, ...],
    mask_ratio: float = 0.6,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random SparK mask: each image keeps ``num_visible`` patches.

    The noise is drawn on the CPU from ``generator`` (or torch's global RNG), so
    the same seed gives the same mask on every device.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid must have 2 (h, w) or 3 (d, h, w) entries, got {grid}")
    if batch_size < 1 or min(grid) < 1:
        raise ValueError(f"batch_size and grid must be positive, got {batch_size} and {grid}")
    num_patches = math.prod(grid)
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator)
    kept = noise.argsort(dim=1)[:, :keep]
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    mask.scatter_(1, kept, True)
    return mask.view(batch_size, *grid).to(device)


def patch_grid(images: torch.Tensor, patch_size: int = PATCH_SIZE) -> tuple[int, ...]:
    """The patch grid ``(h, w)`` of an image batch or ``(d, h, w)`` of a volume batch, checking that
    the sizes divide."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (4, 5):
        raise ValueError(f"images must have shape (B, C, H, W) (or volumes (B, C, D, H, W)), "
                         f"got shape {tuple(images.shape)}")
    sizes = tuple(images.shape[2:])
    if any(s % patch_size or s == 0 for s in sizes):
        what = "height and width" if len(sizes) == 2 else "depth, height and width"
        raise ValueError(
            f"images {what} must be positive multiples of {patch_size} "
            f"(the patch size), got {'x'.join(map(str, sizes))}"
        )
    return tuple(s // patch_size for s in sizes)


def check_mask(active: torch.Tensor, images: torch.Tensor, patch_size: int = PATCH_SIZE) -> None:
    """Raise a clear error unless ``active`` is a boolean ``(B, H/p, W/p)`` (or ``(B, D/p, H/p, W/p)``)
    mask on the images' device."""
    grid = patch_grid(images, patch_size)
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be a boolean torch.Tensor, got {type(active).__name__}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must have dtype torch.bool, got {active.dtype}")
    expected = (images.shape[0], *grid)
    if tuple(active.shape) != expected:
        axes = ", ".join(f"{a}/{patch_size}" for a in "DHW"[3 - len(grid):])
        raise ValueError(
            f"active must have shape (B, {axes}) = {expected} "
            f"for images of shape {tuple(images.shape)}, got {tuple(active.shape)}"
        )
    if active.device != images.device:
        raise ValueError(f"active is on {active.device} but images are on {images.device}; move the mask")


def check_images(images: torch.Tensor, patch_size: int = PATCH_SIZE, check_finite: bool = True) -> None:
    """Raise a clear error for images a masked encoder cannot take."""
    patch_grid(images, patch_size)
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
    if check_finite and not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf values")
