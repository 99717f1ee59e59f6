"""Depthwise k x k convolution on packed active patches (ConvNeXt's 7x7), and its fusion with LayerNorm.

Output row (patch n, y, x), channel c, sums over the K x K taps the input pixel
(y + ky - PAD, x + kx - PAD) of channel c times ``w[tap, c]``. A coordinate outside
[0, P) lies in a neighbour patch up to ``R = ceil(PAD / P)`` patches away (a 7x7 window
at 1-pixel patches reaches 3 away): its slot comes from the radius-R neighbour table
``(N, 2R+1, 2R+1)`` of the ``PatchIndex``; a masked neighbour (-1) reads 0 and so does
one beyond the image (-2: zero padding). No halo copy is made. Depthwise convs are
memory bound, so each program reads a (rows, channels) tile per tap and multiplies
elementwise; P, R, K and PAD are compile-time constants (per stage).

- forward: ``_dw_fwd_kernel``; with ``_dw_ln_fwd_kernel`` the LayerNorm that follows
  in a ConvNeXt block runs in the same program (the conv output is stored once, its row
  statistics gathered on the way, then normalised from cache);
- input gradient: the forward kernel on dy with the kernel flipped (stride 1 and
  padding K // 2, so the transposed conv is a conv);
- weight gradient: ``_dw_wgrad_kernel``, one program per (tap, channel block, row
  split); splits summed in a fixed order (deterministic mode) or with fp32 atomics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .index import _row_position
from .layernorm import _chan_update, _normalize_rows, cast_grad, check_affine, layer_norm_backward
from .reduce import column_sum, sum_leading
from .runtime import BACKEND, TunedKernel, check_tensor, config, interp_block, row_splits

MAX_KERNEL = 7


@triton.jit
def _neighbour_row(nbr_ptr, n, sy, sx, ok, P: tl.constexpr, R: tl.constexpr):
    """Packed row of pixel (sy, sx) relative to patch n (|offset| <= R patches) and the slot holding it
    (-1 masked, -2 beyond the image, -1 for lanes not ``ok``)."""
    S = 2 * R + 1
    oy = (sy + R * P) // P - R
    ox = (sx + R * P) // P - R
    slot = tl.load(nbr_ptr + n * (S * S) + (oy + R) * S + (ox + R), mask=ok, other=-1)
    row = slot.to(tl.int64) * (P * P) + (sy - oy * P) * P + (sx - ox * P)
    return row, slot


@triton.jit
def _dw_tile(x_ptr, w_ptr, nbr_ptr, n, py, px, m_ok, rc, c_ok, C,
             P: tl.constexpr, R: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise conv of a (rows, channels) tile in fp32: sum over taps of x[source row, c] * w[tap, c].

    The kernel rows are a loop and only the taps of one row are unrolled: unrolling all 49 let the
    compiler issue every tap's loads at once, and ptxas spilled kilobytes per thread (kernel_compile)."""
    S = 2 * R + 1
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for ky in range(K):
        sy = py + (ky - PAD)
        oy = (sy + R * P) // P - R  # neighbour offset along y, in [-R, R]
        table_row = n * (S * S) + (oy + R) * S + R
        y_in_patch = (sy - oy * P) * P
        for kx in tl.static_range(K):
            sx = px + (kx - PAD)
            ox = (sx + R * P) // P - R
            slot = tl.load(nbr_ptr + table_row + ox, mask=m_ok, other=-1)
            row = slot.to(tl.int64) * (P * P) + y_in_patch + (sx - ox * P)
            v = tl.load(x_ptr + row[:, None] * C + rc[None, :], mask=(slot >= 0)[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + (ky * K + kx) * C + rc, mask=c_ok, other=0.0)
            acc += v * w[None, :]
    return acc


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, nbr_ptr, M, C,
                   P: tl.constexpr, R: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = depthwise conv of x (+ bias) over a (BLOCK_M rows, BLOCK_C channels) tile; w is (K*K, C) fp32."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    n, _, py, px = _row_position(rm, P, 2)
    acc = _dw_tile(x_ptr, w_ptr, nbr_ptr, n, py, px, m_ok, rc, c_ok, C, P, R, K, PAD, BLOCK_M, BLOCK_C)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_ln_fwd_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, conv_ptr, y_ptr, mean_ptr, rstd_ptr, nbr_ptr,
                      M, C, eps, P: tl.constexpr, R: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """conv = depthwise conv of x (+ bias), y = LayerNorm(conv) over channels, for BLOCK_M rows and every
    channel: the conv output of each channel block is stored and folded into the row statistics, then
    (after a block barrier, so every thread sees every stored block) normalised."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = rm.to(tl.int64)
    n, _, py, px = _row_position(rm, P, 2)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        acc = _dw_tile(x_ptr, w_ptr, nbr_ptr, n, py, px, m_ok, rc, c_ok, C, P, R, K, PAD, BLOCK_M, BLOCK_C)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        conv = acc.to(conv_ptr.dtype.element_ty)
        tl.store(conv_ptr + rows[:, None] * C + rc[None, :], conv, mask=m_ok[:, None] & c_ok[None, :])
        mean, m2 = _chan_update(mean, m2, conv.to(tl.float32), c_ok, c0, C, BLOCK_C)  # of the stored values
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(mean_ptr + rm, mean, mask=m_ok)
    tl.store(rstd_ptr + rm, rstd, mask=m_ok)
    tl.debug_barrier()
    _normalize_rows(conv_ptr, lnw_ptr, lnb_ptr, y_ptr, rows, m_ok, mean, rstd, C, HAS_LNW, HAS_LNB, BLOCK_C)


@triton.jit
def _dw_wgrad_kernel(x_ptr, dy_ptr, out_ptr, nbr_ptr, M, C, ROWS_PER_SPLIT,
                     P: tl.constexpr, R: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[split, tap, c] = sum over this split's output rows m of x[source row of m at tap, c] * dy[m, c].

    Grid: (K*K taps, channel blocks, splits). Products accumulate elementwise and are reduced over the
    rows once at the end. ATOMIC adds into one fp32 (K*K, C) buffer instead of a slice per split.
    """
    tap = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = rc < C
    dy_off = tap // K - PAD
    dx_off = tap % K - PAD
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        n, _, py, px = _row_position(rm, P, 2)
        row, slot = _neighbour_row(nbr_ptr, n, py + dy_off, px + dx_off, m_ok, P, R)
        v = tl.load(x_ptr + row[:, None] * C + rc[None, :], mask=(slot >= 0)[:, None] & c_ok[None, :], other=0.0)
        g = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc += v.to(tl.float32) * g.to(tl.float32)
    part = tl.sum(acc, axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + tap * C + rc, part, mask=c_ok)
    else:
        tl.store(out_ptr + (split.to(tl.int64) * (K * K) + tap) * C + rc, part, mask=c_ok)


# One config each (memory-bound elementwise tiles: nothing to tune between GEMM shapes). BLOCK_C = 64
# keeps 16-byte vector loads along the channels of a row in every dtype. The forward tiles are small
# per thread (16 x 64 over 8 warps): with 32 x 64 rows the fused kernel spilled on sm_90 / sm_80 at
# 4 or 8 warps (benchmarks/kernel_compile.py).
_FWD = TunedKernel(_dw_fwd_kernel, [], key=[], fixed=config(8, 2, BLOCK_M=16, BLOCK_C=64),
                   interp=config(BLOCK_M=256, BLOCK_C=64))
_FWD_LN = TunedKernel(_dw_ln_fwd_kernel, [], key=[], fixed=config(8, 2, BLOCK_M=16, BLOCK_C=64),
                      interp=config(BLOCK_M=256, BLOCK_C=64))
_WGRAD = TunedKernel(_dw_wgrad_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=64, BLOCK_C=64),
                     interp=config(BLOCK_M=256, BLOCK_C=64), reset_to_zero=["out_ptr"])
WGRAD_GRANULE = 256  # rows per split are a multiple of every BLOCK_M above


@dataclass(frozen=True)
class DepthwiseGeometry:
    """A stride-1 depthwise K x K conv (padding K // 2) on patches of side ``p``, reading ``radius`` away."""

    p: int
    kernel: int

    @property
    def pad(self) -> int:
        return self.kernel // 2

    @property
    def radius(self) -> int:
        return -(-self.pad // self.p)

    def constants(self) -> dict:
        return dict(P=self.p, R=self.radius, K=self.kernel, PAD=self.pad)


def depthwise_geometry(p: int, kernel) -> DepthwiseGeometry:
    """The geometry of a depthwise conv with this square ``kernel`` on patches of side ``p``, or a clear error."""
    k = kernel if isinstance(kernel, int) else tuple(kernel)
    if isinstance(k, tuple):
        if len(set(k)) != 1:
            raise NotImplementedError(f"{BACKEND}: depthwise conv needs a square kernel, got {k}")
        k = k[0]
    if k < 1 or k % 2 == 0 or k > MAX_KERNEL:
        raise NotImplementedError(f"{BACKEND}: depthwise conv supports odd kernels up to {MAX_KERNEL}, got {k}")
    if p < 1:
        raise ValueError(f"{BACKEND}: patch side must be positive, got {p}")
    return DepthwiseGeometry(p, k)


def depthwise_taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """``(C, 1, K, K)`` -> fp32 ``(K*K, C)`` (taps major, so a tap's weights are contiguous over channels);
    ``flip`` rotates the kernel by 180 degrees (the input gradient's kernel)."""
    w = weight.detach().float().flatten(1)  # (C, K*K), row-major taps
    if flip:
        w = w.flip(1)
    return w.t().contiguous()


def _check_rows(name: str, rows: torch.Tensor, num_patches: int, geom: DepthwiseGeometry, channels=None) -> None:
    check_tensor(name, rows, dim=2)
    if rows.shape[0] != num_patches * geom.p * geom.p:
        raise ValueError(f"{BACKEND}: {name} has {rows.shape[0]} rows, expected {num_patches} patches x "
                         f"{geom.p}x{geom.p}")
    if channels is not None and rows.shape[1] != channels:
        raise ValueError(f"{BACKEND}: {name} has {rows.shape[1]} channels, expected {channels}")


def _check_inputs(x, taps, nbr, geom: DepthwiseGeometry, num_patches: int) -> None:
    _check_rows("x", x, num_patches, geom)
    C = x.shape[1]
    check_tensor("weight taps", taps, device=x.device, dtypes=(torch.float32,), dim=2)
    if tuple(taps.shape) != (geom.kernel ** 2, C):
        raise ValueError(f"{BACKEND}: depthwise weight taps have shape {tuple(taps.shape)}, expected "
                         f"({geom.kernel ** 2}, {C})")
    check_tensor("neighbours", nbr, device=x.device, dtypes=(torch.int32,), dim=1)
    side = 2 * geom.radius + 1
    if nbr.numel() != num_patches * side * side:
        raise ValueError(f"{BACKEND}: the radius-{geom.radius} neighbour table has {nbr.numel()} entries, "
                         f"expected {num_patches} x {side}x{side}")


def _tile(M: int, C: int) -> dict:
    """Under the interpreter (whose cost is per op of each program): all rows of a small test in one block."""
    return dict(BLOCK_C=interp_block(C, hi=64), BLOCK_M=interp_block(M, hi=2048))


def depthwise_forward(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, nbr: torch.Tensor,
                      geom: DepthwiseGeometry, num_patches: int) -> torch.Tensor:
    """Output rows ``(N*p*p, C)`` in x's dtype; ``taps`` from ``depthwise_taps``, ``nbr`` the flat int32
    radius-``geom.radius`` neighbour table."""
    _check_inputs(x, taps, nbr, geom, num_patches)
    M, C = x.shape
    check_affine("bias", bias, C, x.device)
    y = torch.empty_like(x)
    if M and C:
        _FWD.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"])), x, taps,
                    bias if bias is not None else taps, y, nbr, M, C, HAS_BIAS=bias is not None,
                    interp=_tile(M, C), **geom.constants())
    return y


def depthwise_layer_norm_forward(x, taps, bias, ln_weight, ln_bias, eps: float, nbr, geom: DepthwiseGeometry,
                                 num_patches: int):
    """``(conv, y, mean, rstd)``: the depthwise conv rows and their LayerNorm over channels, in one kernel."""
    _check_inputs(x, taps, nbr, geom, num_patches)
    M, C = x.shape
    check_affine("bias", bias, C, x.device)
    check_affine("LayerNorm weight", ln_weight, C, x.device)
    check_affine("LayerNorm bias", ln_bias, C, x.device)
    conv, y = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if M and C:
        dummy = mean
        _FWD_LN.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), x, taps,
                       bias if bias is not None else dummy, ln_weight if ln_weight is not None else dummy,
                       ln_bias if ln_bias is not None else dummy, conv, y, mean, rstd, nbr, M, C, float(eps),
                       HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
                       interp=_tile(M, C),
                       **geom.constants())
    return conv, y, mean, rstd


def depthwise_wgrad(x: torch.Tensor, dy: torch.Tensor, nbr: torch.Tensor, geom: DepthwiseGeometry,
                    num_patches: int, deterministic: bool) -> torch.Tensor:
    """Weight gradient as fp32 ``(K*K, C)`` (taps major)."""
    _check_rows("x", x, num_patches, geom)
    _check_rows("grad_output", dy, num_patches, geom, x.shape[1])
    if dy.dtype != x.dtype:
        raise TypeError(f"{BACKEND}: grad_output dtype {dy.dtype} differs from the saved input's {x.dtype}")
    M, C = x.shape
    T = geom.kernel ** 2
    if M == 0 or C == 0:
        return torch.zeros(T, C, device=x.device, dtype=torch.float32)
    tile = _tile(M, C)
    c_blocks = triton.cdiv(C, _WGRAD.meta(tile)["BLOCK_C"])
    splits, rows_per_split = row_splits(M, T * c_blocks, x.device, WGRAD_GRANULE)
    atomic = splits > 1 and not deterministic
    out = (torch.zeros(T, C, device=x.device, dtype=torch.float32) if atomic
           else torch.empty(splits, T, C, device=x.device, dtype=torch.float32))
    _WGRAD.launch(lambda meta: (T, c_blocks, splits), x, dy, out, nbr, M, C, rows_per_split, ATOMIC=atomic,
                  interp=tile, **geom.constants())
    if atomic or splits == 1:
        return out.view(T, C)
    return sum_leading(out.view(splits, T * C)).view(T, C)


def _depthwise_backward(dy, x, weight, nbr, geom, num_patches, deterministic, need_x, need_w, need_b, dtypes):
    """(dx, dweight, dbias) of the depthwise conv from the gradient of its output rows."""
    dx = dw = db = None
    if need_x:
        dx = depthwise_forward(dy, depthwise_taps(weight, flip=True), None, nbr, geom, num_patches)
    if need_w:
        g = depthwise_wgrad(x, dy, nbr, geom, num_patches, deterministic)  # (K*K, C)
        dw = g.t().reshape(weight.shape).to(dtypes[0])
    if need_b and dtypes[1] is not None:
        db = column_sum(dy).to(dtypes[1])
    return dx, dw, db


class DepthwiseConv2dFunction(torch.autograd.Function):
    """Depthwise conv on packed rows with Triton forward, input-gradient and weight-gradient kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, nbr, geom, num_patches, deterministic):
        b = None if bias is None else bias.detach().contiguous()
        y = depthwise_forward(x, depthwise_taps(weight), b, nbr, geom, num_patches)
        ctx.save_for_backward(x, weight)
        ctx.nbr, ctx.geom, ctx.num_patches, ctx.deterministic = nbr, geom, num_patches, deterministic
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _depthwise_backward(dy.to(x.dtype).contiguous(), x, weight, ctx.nbr, ctx.geom,
                                         ctx.num_patches, ctx.deterministic, need[0], need[1], need[2], ctx.dtypes)
        return dx, dw, db, None, None, None, None


class DepthwiseConvLayerNormFunction(torch.autograd.Function):
    """``LayerNorm(depthwise_conv(x))`` over channels: one fused forward kernel; the backward is the
    LayerNorm backward (rows) followed by the depthwise conv's."""

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, eps, nbr, geom, num_patches, deterministic):
        detach = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
        conv, y, mean, rstd = depthwise_layer_norm_forward(x, depthwise_taps(weight), detach(bias),
                                                           detach(ln_weight), detach(ln_bias), eps, nbr, geom,
                                                           num_patches)
        ctx.save_for_backward(x, weight, conv, detach(ln_weight), mean, rstd)
        ctx.nbr, ctx.geom, ctx.num_patches, ctx.deterministic = nbr, geom, num_patches, deterministic
        ctx.dtypes = [None if t is None else t.dtype for t in (weight, bias, ln_weight, ln_bias)]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, conv, ln_w, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_conv = any(need[:3])
        dconv, dlw, dlb = layer_norm_backward(dy.to(x.dtype).contiguous(), conv, ln_w, mean, rstd, need_conv,
                                              any(need[3:5]))
        dx = dw = db = None
        if need_conv:
            dx, dw, db = _depthwise_backward(dconv, x, weight, ctx.nbr, ctx.geom, ctx.num_patches,
                                             ctx.deterministic, need[0], need[1], need[2], ctx.dtypes[:2])
        return (dx, dw, db, cast_grad(dlw, ctx.dtypes[2], need[3]), cast_grad(dlb, ctx.dtypes[3], need[4]),
                None, None, None, None, None)
