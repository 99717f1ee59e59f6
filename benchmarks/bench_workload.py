"""A timed unit of work: the step, its rotating inputs, and what to record beside its time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ctssl.sparse import PatchIndex, random_patch_mask
from ctssl.sparse.backends import Backend
from ctssl.sparse.tensor import SparseTensor


@dataclass
class Workload:
    """``step(inputs[i])`` is what is timed; ``images`` counts the images one step processes."""

    step: Callable[[Any], Any]
    inputs: list[Any]
    images: int
    info: dict[str, Any]
    exclude: list[torch.Tensor] = field(default_factory=list)  # weights and inputs: not activations
    backward: bool = True


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_tensor(shape, dtype: torch.dtype, device: torch.device, seed: int, *,
                  channels_last: bool = False, uniform: bool = False) -> torch.Tensor:
    """Seeded random data drawn on ``device`` (fast for batch-128 inputs), never zeros."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    draw = torch.rand if uniform else torch.randn
    t = draw(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def random_mask(batch: int, size: int, ratio: float, device: torch.device, seed: int,
                patch_size: int = 32, dims: int = 2) -> torch.Tensor:
    """SparK's mask over the patch grid of ``size``-sided images (``dims`` 2) or cubic volumes (3)."""
    return random_patch_mask(batch, (size // patch_size,) * dims, ratio, generator=generator(seed), device=device)


def visible_fraction(index: PatchIndex) -> float:
    total = index.active.numel()
    return index.num_patches / total if total else 0.0


def sparse_map(backend: Backend, features: torch.Tensor, index: PatchIndex, stride: int) -> SparseTensor:
    """``features`` (a dense ``(B, C, H/stride, W/stride)`` map) in ``backend``'s layout at ``stride``.

    The engine packs images at stride 1 only; a map at a coarser stride is packed as an
    "image" whose patch side is ``patch_size / stride`` (same visible patches, same slot
    order) and then re-labelled with the batch's real index and stride, exactly as the
    encoder's stage maps are.
    """
    if stride == 1:
        return backend.sparse_input(features, index)
    staged = backend.sparse_input(features, PatchIndex(index.active, index.patch_size // stride))
    return type(staged)(staged.values, index, stride, backend)
