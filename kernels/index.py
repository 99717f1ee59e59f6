"""Index math of the packed layout shared by the kernels: a packed row's place in its patch,
and the packed row (through the neighbour table) of a coordinate relative to a patch.

One code path for images and volumes: ``NDIM`` (a constexpr, 2 or 3) selects the patch grid;
for images the depth coordinate is the constant 0 and every depth term compiles away.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_position(rm, P, NDIM: tl.constexpr):
    """Slot and coordinates (z, y, x) inside its patch of side P of each packed row index ``rm`` (rows
    are slot-major, then row-major within the patch); z is 0 for images."""
    PP = P * P
    if NDIM == 3:
        n = rm // (PP * P)
        z = (rm % (PP * P)) // PP
    else:
        n = rm // PP
        z = 0
    return n, z, (rm % PP) // P, rm % P


@triton.jit
def _source_rows(nbr_ptr, n, sz, sy, sx, ok, P_SRC, NDIM: tl.constexpr):
    """Packed row read at coordinate (sz, sy, sx) relative to patch n, and the slot holding it.

    Coordinates lie in [-P_SRC, 2*P_SRC); the neighbour table ((N, 3, 3) for images, (N, 3, 3, 3)
    for volumes, whose sz is ignored for images) gives the patch that holds them: its slot, or -1
    (masked, reads 0) / -2 (beyond the image); lanes not ``ok`` get -1. The row is valid where the
    slot is >= 0. Works elementwise on any broadcast shape.
    """
    # which of the three patches along each axis: on [-P, 2P) two compares equal (s + P) // P, without
    # an integer division by a run-time value
    ny = (sy >= 0).to(tl.int32) + (sy >= P_SRC).to(tl.int32)
    nx = (sx >= 0).to(tl.int32) + (sx >= P_SRC).to(tl.int32)
    if NDIM == 3:
        nz = (sz >= 0).to(tl.int32) + (sz >= P_SRC).to(tl.int32)
        nslot = tl.load(nbr_ptr + n * 27 + nz * 9 + ny * 3 + nx, mask=ok, other=-1)
        lz = sz - (nz - 1) * P_SRC
    else:
        nslot = tl.load(nbr_ptr + n * 9 + ny * 3 + nx, mask=ok, other=-1)
    ly = sy - (ny - 1) * P_SRC
    lx = sx - (nx - 1) * P_SRC
    if NDIM == 3:
        row = nslot.to(tl.int64) * (P_SRC * P_SRC * P_SRC) + (lz * P_SRC + ly) * P_SRC + lx
    else:
        row = nslot.to(tl.int64) * (P_SRC * P_SRC) + ly * P_SRC + lx
    return row, nslot
