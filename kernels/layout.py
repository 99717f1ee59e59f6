"""Conversions between dense ``(B, C, H, W)`` maps (or ``(B, C, D, H, W)`` volumes) and packed active-patch rows.

- pack (``sparse_input``; also the backward of unpack): row (n, y, x) reads the
  dense pixel of patch n = (b, i, j) at (i*p + y, j*p + x), any input strides;
- unpack (``to_dense``, ``densify``; also the backward of pack): every dense pixel
  is written once, from its patch's row or, where the patch is masked, 0 or the
  per-channel token, so no zero-fill pass is needed;
- ``masked_channel_sum``: the token's gradient, the sum of the dense gradient over
  masked pixels (block partials, then a fixed-order sum: deterministic).

Every kernel takes ``NDIM`` (2 or 3) as a constexpr; a volume's depth terms compile away for images.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .index import _row_position
from .reduce import sum_leading
from .runtime import BACKEND, TunedKernel, check_tensor, config


@triton.jit
def _pack_kernel(img_ptr, rows_ptr, coords_ptr, M, C, P, s_b, s_c, s_d, s_h, s_w,
                 NDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """rows[m, c] = img[b, c, i*P + y, j*P + x] for row m = (slot n, y, x), coords[n] = (b, i, j)
    (volumes: img[b, c, k*P + z, i*P + y, j*P + x], coords[n] = (b, k, i, j); s_d is the depth stride)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    n, z, y, x = _row_position(rm, P, NDIM)
    b = tl.load(coords_ptr + n * (NDIM + 1), mask=m_ok, other=0).to(tl.int64)
    i = tl.load(coords_ptr + n * (NDIM + 1) + (NDIM - 1), mask=m_ok, other=0)
    j = tl.load(coords_ptr + n * (NDIM + 1) + NDIM, mask=m_ok, other=0)
    pix = b * s_b + (i * P + y).to(tl.int64) * s_h + (j * P + x).to(tl.int64) * s_w
    if NDIM == 3:
        k = tl.load(coords_ptr + n * 4 + 1, mask=m_ok, other=0)
        pix += (k * P + z).to(tl.int64) * s_d
    mask = m_ok[:, None] & c_ok[None, :]
    v = tl.load(img_ptr + pix[:, None] + rc.to(tl.int64)[None, :] * s_c, mask=mask, other=0.0)
    tl.store(rows_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], v.to(rows_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_pixel_slot(slot_ptr, rp, p_ok, D, H, W, P, GW, NDIM: tl.constexpr):
    """Sample b, depth zz (0 for images), row yy, column xx of dense pixels ``rp`` and the slot of the patch
    holding each (-1: masked)."""
    HW = H * W
    if NDIM == 3:
        b = rp // (D * HW)
        zz = (rp % (D * HW)) // HW
    else:
        b = rp // HW
        zz = 0
    yy = (rp % HW) // W
    xx = rp % W
    if NDIM == 3:
        slot = tl.load(slot_ptr + ((b * (D // P) + zz // P) * (H // P) + yy // P) * GW + xx // P, mask=p_ok, other=-1)
    else:
        slot = tl.load(slot_ptr + (b * (H // P) + yy // P) * GW + xx // P, mask=p_ok, other=-1)
    return b, zz, yy, xx, slot


@triton.jit
def _unpack_kernel(rows_ptr, out_ptr, slot_ptr, token_ptr, NPIX, C, D, H, W, P, GW, o_b, o_c, o_d, o_h, o_w,
                   NDIM: tl.constexpr, FILL_TOKEN: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, c, Y, X] (strides o_*; volumes out[b, c, Z, Y, X]) = the packed row of that pixel, or
    0 / token[c] if masked.

    With channels-last output o_c is 1, which the JIT makes a constant: rows and output are
    then both contiguous along C and the stores vectorize."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    rp = pid_p * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = rp < NPIX
    c_ok = rc < C
    b, zz, yy, xx, slot = _dense_pixel_slot(slot_ptr, rp, p_ok, D, H, W, P, GW, NDIM)
    if NDIM == 3:
        row = slot.to(tl.int64) * (P * P * P) + ((zz % P) * P + yy % P) * P + xx % P
    else:
        row = slot.to(tl.int64) * (P * P) + (yy % P) * P + xx % P
    visible = (slot >= 0)[:, None] & c_ok[None, :]
    v = tl.load(rows_ptr + row[:, None] * C + rc[None, :], mask=visible, other=0.0)
    if FILL_TOKEN:
        tok = tl.load(token_ptr + rc, mask=c_ok, other=0.0).to(v.dtype)
        v = tl.where(visible, v, tok[None, :])
    pix = b.to(tl.int64) * o_b + yy.to(tl.int64) * o_h + xx.to(tl.int64) * o_w
    if NDIM == 3:
        pix += zz.to(tl.int64) * o_d
    offs = pix[:, None] + rc.to(tl.int64)[None, :] * o_c
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _masked_sum_kernel(g_ptr, slot_ptr, part_ptr, NPIX, C, D, H, W, P, GW, s_b, s_c, s_d, s_h, s_w,
                       NDIM: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[block, c] = sum of g[b, c, (Z,) Y, X] over this block's pixels that lie in masked patches."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    rp = pid_p * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = rp < NPIX
    c_ok = rc < C
    b, zz, yy, xx, slot = _dense_pixel_slot(slot_ptr, rp, p_ok, D, H, W, P, GW, NDIM)
    masked = (p_ok & (slot < 0))[:, None] & c_ok[None, :]
    pix = b.to(tl.int64) * s_b + yy.to(tl.int64) * s_h + xx.to(tl.int64) * s_w
    if NDIM == 3:
        pix += zz.to(tl.int64) * s_d
    offs = pix[:, None] + rc.to(tl.int64)[None, :] * s_c
    g = tl.load(g_ptr + offs, mask=masked, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid_p * C + rc, tl.sum(g, axis=0), mask=c_ok)


_PACK = TunedKernel(_pack_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=64, BLOCK_C=32),
                    interp=config(BLOCK_M=1024, BLOCK_C=64))
_UNPACK = TunedKernel(_unpack_kernel, [], key=[], fixed=config(4, 2, BLOCK_PIX=128, BLOCK_C=16),
                      interp=config(BLOCK_PIX=1024, BLOCK_C=64))
_MASKED_SUM = TunedKernel(_masked_sum_kernel, [], key=[], fixed=config(4, 2, BLOCK_PIX=256, BLOCK_C=16),
                          interp=config(BLOCK_PIX=2048, BLOCK_C=64))


def _check_tables(coords_or_slot: torch.Tensor, name: str, device) -> None:
    check_tensor(name, coords_or_slot, device=device, dtypes=(torch.int32,))


def _dense_layout(shape, strides) -> tuple[int, tuple[int, int, int], tuple[int, ...]]:
    """Spatial dims, (D, H, W) with D = 1 for images, and the strides (b, c, d, h, w) with d = 0 for
    images, of a dense ``(B, C, H, W)`` or ``(B, C, D, H, W)`` map: every kernel takes both."""
    if len(shape) not in (4, 5):
        raise ValueError(f"{BACKEND}: a dense map must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(shape)}")
    nd = len(shape) - 2
    b, c, *rest = strides
    return nd, (shape[2] if nd == 3 else 1, shape[-2], shape[-1]), (b, c, rest[0] if nd == 3 else 0, *rest[-2:])


def _channels_last(memory_format: torch.memory_format, ndim: int) -> torch.memory_format:
    """torch's channels-last format of a volume is its own constant."""
    return torch.channels_last_3d if ndim == 3 and memory_format == torch.channels_last else memory_format


def pack(images: torch.Tensor, coords: torch.Tensor, p: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``(N*p**ndim, C)`` of the visible patches of a dense ``(B, C, H, W)`` (or ``(B, C, D, H, W)``)
    map, any strides."""
    check_tensor("images", images, contiguous=False)
    nd, _, strides = _dense_layout(images.shape, images.stride())
    _check_tables(coords, "coords", images.device)
    if any(size % p for size in images.shape[2:]):
        raise ValueError(f"{BACKEND}: images of size {tuple(images.shape[2:])} are not a grid of "
                         f"{'x'.join([str(p)] * nd)} patches")
    if coords.dim() != 2 or coords.shape[1] != nd + 1:
        raise ValueError(f"{BACKEND}: coords must be (N, {nd + 1}) for {nd}-D maps, got {tuple(coords.shape)}")
    N, C = coords.shape[0], images.shape[1]
    M = N * p ** nd
    rows = torch.empty(M, C, device=images.device, dtype=out_dtype or images.dtype)
    if M and C:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        _PACK.launch(grid, images, rows, coords, M, C, p, *strides, NDIM=nd)
    return rows


def unpack(rows: torch.Tensor, slot: torch.Tensor, shape: tuple[int, ...], p: int,
           token: torch.Tensor | None = None,
           memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """Dense ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) from rows; masked patches hold 0, or ``token`` per channel.

    Channels-last by default: the rows' own order, and what the dense decoder runs in under the
    training recipe (the cuda backend densifies to it too)."""
    check_tensor("rows", rows, dim=2)
    _check_tables(slot, "slot", rows.device)
    B, C = shape[:2]
    if rows.shape[1] != C:
        raise ValueError(f"{BACKEND}: rows have {rows.shape[1]} channels, expected {C}")
    if token is not None:
        check_tensor("token", token, device=rows.device, dtypes=None)
        if token.numel() != C:
            raise ValueError(f"{BACKEND}: token has {token.numel()} entries, expected one per channel ({C})")
    out = torch.empty(*shape, device=rows.device, dtype=rows.dtype,
                      memory_format=_channels_last(memory_format, len(shape) - 2))
    nd, (D, H, W), strides = _dense_layout(out.shape, out.stride())
    npix = B * D * H * W
    if npix and C:
        grid = lambda meta: (triton.cdiv(npix, meta["BLOCK_PIX"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        _UNPACK.launch(grid, rows, out, slot, token if token is not None else rows, npix, C, D, H, W, p, W // p,
                       *strides, NDIM=nd, FILL_TOKEN=token is not None)
    return out


def masked_channel_sum(g: torch.Tensor, slot: torch.Tensor, p: int) -> torch.Tensor:
    """fp32 ``(C,)``: the sum of a dense ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) map over pixels of masked
    patches."""
    check_tensor("grad", g, contiguous=False)
    nd, (D, H, W), strides = _dense_layout(g.shape, g.stride())
    _check_tables(slot, "slot", g.device)
    B, C = g.shape[:2]
    npix = B * D * H * W
    bp = _MASKED_SUM.meta()["BLOCK_PIX"]
    blocks = triton.cdiv(npix, bp)
    if blocks == 0 or C == 0:
        return torch.zeros(C, device=g.device, dtype=torch.float32)
    part = torch.empty(blocks, C, device=g.device, dtype=torch.float32)
    _MASKED_SUM.launch(lambda meta: (blocks, triton.cdiv(C, meta["BLOCK_C"])), g, slot, part, npix, C, D, H, W, p,
                       W // p, *strides, NDIM=nd)
    return part[0] if blocks == 1 else sum_leading(part)


# --- autograd ------------------------------------------------------------------------


class PackFunction(torch.autograd.Function):
    """Dense images -> packed rows; backward unpacks the row gradient (zeros where masked)."""

    @staticmethod
    def forward(ctx, images, coords, slot, p):
        ctx.tables, ctx.p, ctx.shape, ctx.dtype = (coords, slot), p, tuple(images.shape), images.dtype
        last = _channels_last(torch.channels_last, images.dim() - 2)
        ctx.memory_format = (last if not images.is_contiguous() and images.is_contiguous(memory_format=last)
                             else torch.contiguous_format)
        return pack(images, coords, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        coords, slot = ctx.tables
        grad = unpack(g.contiguous(), slot, ctx.shape, ctx.p, memory_format=ctx.memory_format)
        return grad.to(ctx.dtype), None, None, None  # laid out like the images


class UnpackFunction(torch.autograd.Function):
    """Packed rows -> dense map (masked: 0 or token); backward packs the gradient and sums it over masked pixels."""

    @staticmethod
    def forward(ctx, rows, token, coords, slot, shape, p):
        ctx.tables, ctx.p = (coords, slot), p
        ctx.token_dtype = None if token is None else token.dtype
        ctx.token_shape = None if token is None else token.shape
        tok = None if token is None else token.detach().reshape(-1).contiguous()
        return unpack(rows, slot, shape, p, tok)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        coords, slot = ctx.tables
        d_rows = pack(g, coords, ctx.p) if ctx.needs_input_grad[0] else None
        d_token = None
        if ctx.token_dtype is not None and ctx.needs_input_grad[1]:
            d_token = masked_channel_sum(g, slot, ctx.p).to(ctx.token_dtype).view(ctx.token_shape)
        return d_rows, d_token, None, None, None, None
