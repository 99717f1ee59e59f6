"""Index math of the packed layout shared by the kernels: a packed row's place in its patch,
and the packed row (through the neighbour table) of a coordinate relative to a patch."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_position(rm, P):
    """Slot, row and column inside its P x P patch of each packed row index ``rm`` (rows are
    slot-major, then row-major within the patch)."""
    PP = P * P
    return rm // PP, (rm % PP) // P, rm % P


@triton.jit
def _source_rows(nbr_ptr, n, sy, sx, ok, P_SRC):
    """Packed row read at coordinate (sy, sx) relative to patch n, and the slot holding it.

    ``sy``/``sx`` lie in [-P_SRC, 2*P_SRC); the neighbour table gives the patch that
    holds them: its slot, or -1 (masked, reads 0) / -2 (beyond the image); lanes
    not ``ok`` get -1. The row is valid where the slot is >= 0. Works elementwise
    on any broadcast shape.
    """
    # which of the three patches along each axis: on [-P, 2P) two compares equal (s + P) // P, without
    # an integer division by a run-time value
    ny = (sy >= 0).to(tl.int32) + (sy >= P_SRC).to(tl.int32)
    nx = (sx >= 0).to(tl.int32) + (sx >= P_SRC).to(tl.int32)
    nslot = tl.load(nbr_ptr + n * 9 + ny * 3 + nx, mask=ok, other=-1)
    ly = sy - (ny - 1) * P_SRC
    lx = sx - (nx - 1) * P_SRC
    row = nslot.to(tl.int64) * (P_SRC * P_SRC) + ly * P_SRC + lx
    return row, nslot
