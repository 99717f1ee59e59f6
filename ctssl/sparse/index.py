"""The patch index: built once per batch, shared by every layer of every stage.

Because SparK masks whole patches, the visible set is the same patch set at every
stride; only the patch side shrinks (``p = patch_size / stride``). The index maps
each visible patch to a *slot* n (its block of ``p * p`` rows in a packed tensor)
and records its 3x3 neighbourhood of slots, from which every gather plan derives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mask import PATCH_SIZE

INACTIVE = -1
"""Neighbour-table value of a masked neighbour patch (reads as 0)."""
OUTSIDE = -2
"""Neighbour-table value of a neighbour beyond the image border (reads as padding)."""


@dataclass(frozen=True)
class HaloPlan:
    """Where each ring pixel of a halo-padded patch comes from, for one (p, halo).

    A halo-padded patch has side ``P = p + 2 * halo``; its interior is the patch
    itself and its ring is read from the neighbours. Positions index the flattened
    ``(N * P * P)`` halo tensor, sources the flattened ``(N * p * p)`` packed rows.
    """

    p: int
    halo: int
    ring_dst: torch.Tensor  # positions fed by a visible neighbour
    ring_src: torch.Tensor  # the packed rows they read
    ring_zero: torch.Tensor  # positions in a masked neighbour: read 0
    ring_outside: torch.Tensor  # positions beyond the image: read the padding value


class PatchIndex:
    """Visible patches of a batch and their neighbours, with cached per-stride plans."""

    _backend_caches: dict[str, dict]
    """Per-backend caches, by backend name (see ``backend_cache``)."""

    def __init__(self, active: torch.Tensor, patch_size: int = PATCH_SIZE):
        if active.dtype != torch.bool or active.dim() != 3:
            raise TypeError(f"active must be a (B, h, w) bool tensor, got {active.dtype} {tuple(active.shape)}")
        self.active = active
        self.patch_size = patch_size
        self.batch_size, self.h, self.w = active.shape
        self.device = active.device
        flat = active.reshape(-1)
        self.patch_ids = flat.nonzero().squeeze(1)  # (N,) flat id b*h*w + i*w + j
        self.num_patches = int(self.patch_ids.numel())
        slot = torch.full((flat.numel(),), INACTIVE, dtype=torch.long, device=self.device)
        slot[self.patch_ids] = torch.arange(self.num_patches, device=self.device)
        self.slot = slot.view(self.batch_size, self.h, self.w)
        hw = self.h * self.w
        b = self.patch_ids // hw
        i = (self.patch_ids // self.w) % self.h
        j = self.patch_ids % self.w
        self.coords = torch.stack([b, i, j], dim=1)  # (N, 3)
        padded = F.pad(self.slot, (1, 1, 1, 1), value=OUTSIDE)
        nbr = [padded[b, i + dy, j + dx] for dy in range(3) for dx in range(3)]
        self.neighbours = torch.stack(nbr, dim=1).view(self.num_patches, 3, 3).contiguous()
        self._halo_plans: dict[tuple[int, int], HaloPlan] = {}
        self._dense_masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._row_samples: dict[int, torch.Tensor] = {}

    def patch_side(self, stride: int) -> int:
        """Side of a patch at a feature stride; the stride must divide the patch size."""
        if stride < 1 or self.patch_size % stride:
            raise ValueError(f"stride {stride} does not divide the patch size {self.patch_size}")
        return self.patch_size // stride

    def visible_per_image(self) -> torch.Tensor:
        return self.active.flatten(1).sum(1)

    def dense_mask(self, stride: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The patch mask upsampled to a feature map of ``stride``: ``(B, 1, H/s, W/s)``."""
        key = (stride, dtype)
        if key not in self._dense_masks:
            p = self.patch_side(stride)
            m = self.active.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
            self._dense_masks[key] = m.unsqueeze(1).to(dtype)
        return self._dense_masks[key]

    def row_samples(self, stride: int) -> torch.Tensor:
        """Image index of every packed row at ``stride``: ``(N * p * p,)``."""
        if stride not in self._row_samples:
            p = self.patch_side(stride)
            self._row_samples[stride] = self.coords[:, 0].repeat_interleave(p * p)
        return self._row_samples[stride]

    def halo_plan(self, p: int, halo: int) -> HaloPlan:
        """Gather plan for patches of side ``p`` padded by ``halo`` pixels (cached)."""
        key = (p, halo)
        if key not in self._halo_plans:
            self._halo_plans[key] = self._build_halo_plan(p, halo)
        return self._halo_plans[key]

    def _build_halo_plan(self, p: int, halo: int) -> HaloPlan:
        if halo > p:
            raise ValueError(
                f"a halo of {halo} pixels is wider than the patch side {p}: the packed layout "
                f"reads only the 8 neighbour patches (kernel too large for this stride)"
            )
        P = p + 2 * halo
        dev = self.device
        yy = torch.arange(P, device=dev)
        # which neighbour (0, 1, 2) and which pixel inside it each halo coordinate reads
        nb = torch.where(yy < halo, 0, torch.where(yy >= halo + p, 2, 1))
        src = (yy - halo) % p
        ny, nx = nb.view(P, 1).expand(P, P), nb.view(1, P).expand(P, P)
        sy, sx = src.view(P, 1).expand(P, P), src.view(1, P).expand(P, P)
        ring = ~((ny == 1) & (nx == 1))
        ny, nx, sy, sx = ny[ring], nx[ring], sy[ring], sx[ring]  # (R,)
        local = (torch.arange(P * P, device=dev).view(P, P))[ring]  # (R,)
        nslot = self.neighbours[:, ny, nx]  # (N, R)
        pos = (torch.arange(self.num_patches, device=dev).view(-1, 1) * (P * P) + local.view(1, -1))
        srcrow = nslot * (p * p) + (sy * p + sx).view(1, -1)
        visible = nslot >= 0
        return HaloPlan(
            p=p,
            halo=halo,
            ring_dst=pos[visible].contiguous(),
            ring_src=srcrow[visible].contiguous(),
            ring_zero=pos[nslot == INACTIVE].contiguous(),
            ring_outside=pos[nslot == OUTSIDE].contiguous(),
        )

    # --- per-backend caches -------------------------------------------------
    def backend_cache(self, backend: str) -> dict:
        """The dict where backend ``backend`` keeps what it derives from this batch (the tables in its
        own formats, a library's coordinate maps), built on first use and dropped with the index.

        The one place a backend stores state on the index: backends never set attributes of their own.
        """
        try:
            caches = self._backend_caches
        except AttributeError:  # created on first use, so the index's constructor stays the index's
            caches = self._backend_caches = {}
        return caches.setdefault(backend, {})
