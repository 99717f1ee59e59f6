"""The patch index: built once per batch, shared by every layer of every stage.

Because SparK masks whole patches, the visible set is the same patch set at every
stride; only the patch side shrinks (``p = patch_size / stride``). The index maps
each visible patch to a *slot* n (its block of ``p ** ndim`` rows in a packed tensor)
and records its neighbourhood of slots, from which every gather plan derives.

One index serves images and volumes: the patch grid has ``ndim`` = 2 axes ``(h, w)``
or 3 axes ``(d, h, w)``. A layer whose window reaches ``halo`` pixels beyond a patch of
side ``p`` needs the neighbours up to ``radius = ceil(halo / p)`` patches away (a 3x3
conv: 1; ConvNeXt's 7x7 depthwise conv at 1-pixel patches: 3). Neighbour tables are
built once per batch and radius, halo plans once per ``(p, halo)``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mask import PATCH_SIZE

INACTIVE = -1
"""Neighbour-table value of a masked neighbour patch (reads as 0)."""
OUTSIDE = -2
"""Neighbour-table value of a neighbour beyond the grid border (reads as padding)."""


def neighbour_radius(patch_side: int, halo: int) -> int:
    """How many patches away a window reaching ``halo`` pixels past a patch of side ``patch_side`` reads."""
    return math.ceil(halo / patch_side) if halo > 0 else 0


@dataclass(frozen=True)
class HaloPlan:
    """Where each ring pixel of a halo-padded patch comes from, for one (p, halo).

    A halo-padded patch has side ``P = p + 2 * halo`` on each of its ``ndim`` axes; its
    interior is the patch itself and its ring is read from the neighbours (up to
    ``radius`` patches away). Positions index the flattened ``(N * P ** ndim)`` halo
    tensor, sources the flattened ``(N * p ** ndim)`` packed rows.
    """

    p: int
    halo: int
    ndim: int
    radius: int
    ring_dst: torch.Tensor  # positions fed by a visible neighbour
    ring_src: torch.Tensor  # the packed rows they read
    ring_zero: torch.Tensor  # positions in a masked neighbour: read 0
    ring_outside: torch.Tensor  # positions beyond the grid: read the padding value

    @property
    def padded_side(self) -> int:
        return self.p + 2 * self.halo


class PatchIndex:
    """Visible patches of a batch and their neighbours, with cached per-stride plans.

    ``active`` is a boolean patch mask ``(B, h, w)`` (images) or ``(B, d, h, w)`` (volumes).
    """


    def __init__(self, active: torch.Tensor, patch_size: int = PATCH_SIZE):
        if active.dtype != torch.bool or active.dim() not in (3, 4):
            raise TypeError(f"active must be a (B, h, w) or (B, d, h, w) bool tensor, got {active.dtype} "
                            f"{tuple(active.shape)}")
        self.active = active
        self.patch_size = patch_size
        self.batch_size = active.shape[0]
        self.grid: tuple[int, ...] = tuple(active.shape[1:])
        self.ndim = len(self.grid)
        self.h, self.w = self.grid[-2:]
        self.device = active.device
        flat = active.reshape(-1)
        self.patch_ids = flat.nonzero().squeeze(1)  # (N,) flat id over (B, *grid)
        self.num_patches = int(self.patch_ids.numel())
        slot = torch.full((flat.numel(),), INACTIVE, dtype=torch.long, device=self.device)
        slot[self.patch_ids] = torch.arange(self.num_patches, device=self.device)
        self.slot = slot.view(active.shape)
        coords, rest = [], self.patch_ids
        for size in reversed(self.grid):
            coords.append(rest % size)
            rest = rest // size
        coords.append(rest)
        self.coords = torch.stack(coords[::-1], dim=1)  # (N, 1 + ndim): b, then the grid position
        self._neighbour_tables: dict[int, torch.Tensor] = {}
        self._halo_plans: dict[tuple[int, int], HaloPlan] = {}
        self._dense_masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._row_samples: dict[int, torch.Tensor] = {}
        self._backend_caches: dict[str, dict] = {}

    # --- neighbours ----------------------------------------------------------
    @property
    def neighbours(self) -> torch.Tensor:
        """The radius-1 table: ``(N, 3, 3)`` (or ``(N, 3, 3, 3)``), what 3x3 windows read."""
        return self.neighbour_table(1)

    def neighbour_table(self, radius: int) -> torch.Tensor:
        """Slots of the patches up to ``radius`` away: ``(N, 2r+1, ...)`` over the ``ndim`` grid axes.

        Entry ``[n, r + dz, r + dy, r + dx]`` is the slot of patch n's neighbour at that offset,
        ``INACTIVE`` where it is masked, ``OUTSIDE`` beyond the grid. Built once per radius.
        """
        if radius < 0:
            raise ValueError(f"neighbour radius must be >= 0, got {radius}")
        if radius not in self._neighbour_tables:
            self._neighbour_tables[radius] = self._build_neighbour_table(radius)
        return self._neighbour_tables[radius]

    def _build_neighbour_table(self, r: int) -> torch.Tensor:
        padded = F.pad(self.slot, (r, r) * self.ndim, value=OUTSIDE)
        pos = self.coords.unbind(1)  # b, then one coordinate per grid axis
        side = 2 * r + 1
        taps = []
        for offset in itertools.product(range(side), repeat=self.ndim):
            taps.append(padded[(pos[0],) + tuple(c + o for c, o in zip(pos[1:], offset))])
        table = torch.stack(taps, dim=1) if taps else self.slot.new_empty(0)
        return table.view(self.num_patches, *([side] * self.ndim)).contiguous()

    # --- per-stride facts ------------------------------------------------------
    def patch_side(self, stride: int) -> int:
        """Side of a patch at a feature stride; the stride must divide the patch size."""
        if stride < 1 or self.patch_size % stride:
            raise ValueError(f"stride {stride} does not divide the patch size {self.patch_size}")
        return self.patch_size // stride

    def rows_per_patch(self, stride: int) -> int:
        """Packed rows of one patch at ``stride``: ``p ** ndim``."""
        return self.patch_side(stride) ** self.ndim

    def dense_grid(self, stride: int) -> tuple[int, ...]:
        """Spatial shape of a dense feature map at ``stride``."""
        p = self.patch_side(stride)
        return tuple(g * p for g in self.grid)

    def visible_per_image(self) -> torch.Tensor:
        return self.active.flatten(1).sum(1)

    def dense_mask(self, stride: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The patch mask upsampled to a feature map of ``stride``: ``(B, 1, *dense_grid)``."""
        key = (stride, dtype)
        if key not in self._dense_masks:
            p = self.patch_side(stride)
            m = self.active
            for axis in range(1, self.ndim + 1):
                m = m.repeat_interleave(p, dim=axis)
            self._dense_masks[key] = m.unsqueeze(1).to(dtype)
        return self._dense_masks[key]

    def row_samples(self, stride: int) -> torch.Tensor:
        """Sample (image or volume) index of every packed row at ``stride``: ``(N * p ** ndim,)``."""
        if stride not in self._row_samples:
            self._row_samples[stride] = self.coords[:, 0].repeat_interleave(self.rows_per_patch(stride))
        return self._row_samples[stride]

    # --- halo plans --------------------------------------------------------------
    def halo_plan(self, p: int, halo: int) -> HaloPlan:
        """Gather plan for patches of side ``p`` padded by ``halo`` pixels (cached)."""
        key = (p, halo)
        if key not in self._halo_plans:
            self._halo_plans[key] = self._build_halo_plan(p, halo)
        return self._halo_plans[key]

    def _build_halo_plan(self, p: int, halo: int) -> HaloPlan:
        if p < 1 or halo < 0:
            raise ValueError(f"halo plan needs a patch side >= 1 and a halo >= 0, got p={p}, halo={halo}")
        r = neighbour_radius(p, halo)
        side, P, dev = 2 * r + 1, p + 2 * halo, self.device
        t = torch.arange(P, device=dev) - halo
        offset = torch.div(t, p, rounding_mode="floor")  # neighbour offset (-r..r) of each padded coordinate
        src = t - offset * p  # the pixel it reads inside that neighbour
        axes_off = torch.meshgrid(*([offset] * self.ndim), indexing="ij")
        axes_src = torch.meshgrid(*([src] * self.ndim), indexing="ij")
        ring = torch.stack([o != 0 for o in axes_off]).any(0).reshape(-1)  # (P ** ndim,)
        nb, src_local = torch.zeros_like(ring, dtype=torch.long), torch.zeros_like(ring, dtype=torch.long)
        for o, s in zip(axes_off, axes_src):  # row-major flat index over the neighbourhood and the patch
            nb = nb * side + (o.reshape(-1) + r)
            src_local = src_local * p + s.reshape(-1)
        local = torch.arange(P ** self.ndim, device=dev)[ring]  # (R,)
        nslot = self.neighbour_table(r).reshape(self.num_patches, side ** self.ndim)[:, nb[ring]]  # (N, R)
        pos = torch.arange(self.num_patches, device=dev).view(-1, 1) * (P ** self.ndim) + local.view(1, -1)
        srcrow = nslot * (p ** self.ndim) + src_local[ring].view(1, -1)
        visible = nslot >= 0
        return HaloPlan(
            p=p,
            halo=halo,
            ndim=self.ndim,
            radius=r,
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
        return self._backend_caches.setdefault(backend, {})
