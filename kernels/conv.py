"""Sparse convolution on packed active patches: implicit GEMMs through the neighbour table.

A conv output row (patch n, y, x) reads, for tap (ky, kx), the input pixel
(s*y + ky*d - pad, s*x + kx*d - pad) relative to patch n; coordinates outside
[0, p) fall into one of the 8 neighbour patches, looked up in the (N, 3, 3)
neighbour table (a masked or outside neighbour reads 0). With M output rows,
K = taps * C_in and N = C_out this is one implicit GEMM; no halo copy is made.
Volumes are the same GEMM over up to 27 neighbours ((N, 3, 3, 3) table) and k**3
taps: every kernel takes ``NDIM`` (2 or 3) as a constexpr, and a volume adds a
depth term to each coordinate that images compile without.

- forward: ``_gather_gemm_kernel`` over output rows, weight (taps, C_in, C_out);
- input gradient: the same kernel, gathering dy with the flipped, transposed
  weight (taps, C_out, C_in). For stride s the input rows split into s*s parity
  classes (y % s, x % s); each class reads dy on a stride-1 grid through its own
  tap list, so no tap is wasted on pixels it does not touch (the transposed gather);
- weight gradient: ``_wgrad_kernel``, a GEMM over output rows per tap, split over
  rows for parallelism; the splits are summed in a fixed order (deterministic
  mode) or with fp32 atomics (fast mode).

Tap tables are small int32 tensors ``(classes, taps, NDIM + 1)`` of (dy offset, dx
offset, weight tap[, dz offset]); a class's source coordinate is ``step * grid + offset``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .index import _row_position, _source_rows
from .reduce import column_sum, sum_leading
from .runtime import (
    BACKEND,
    GPU_STATS_BLOCK_M,
    STATS_BLOCK_M,
    TunedKernel,
    check_tensor,
    config,
    dot_precision,
    interp_block,
    row_splits,
    size_key,
)

FWD_BLOCK_M = STATS_BLOCK_M
"""Rows per forward program: fixed (not tuned) because the fused BN statistics are per block of rows."""


@triton.jit
def _gather_gemm_kernel(
    src_ptr, w_ptr, bias_ptr, dst_ptr, stats_ptr, nbr_ptr, taps_ptr, ntaps_ptr,
    M, C_IN, C_OUT, Q, P_SRC, P_DST, SRC_STEP, DST_STEP, MAX_TAPS, M_KEY,
    NDIM: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr, FLAT_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dst[rows of class c] = sum over the class's taps of gather(src) @ w[tap] (+ bias).

    Grid: (row blocks of one class, C_OUT blocks, classes). A class enumerates a
    Q x Q (x Q) grid (a, b) per patch; it reads src at (SRC_STEP*a + dy, SRC_STEP*b + dx)
    and writes dst pixel (DST_STEP*a + ry, DST_STEP*b + rx), class c = ry*DST_STEP + rx
    (volumes: c = (rz*DST_STEP + ry)*DST_STEP + rx, and likewise in depth).
    FLAT_K walks K = taps*C_IN as one axis (for C_IN smaller than a K block, the stem).
    STATS writes per row block the mean and M2 of each output channel (BN statistics).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cls = tl.program_id(2)
    if NDIM == 3:
        rz = cls // (DST_STEP * DST_STEP)
        ry = (cls // DST_STEP) % DST_STEP
    else:
        ry = cls // DST_STEP
    rx = cls % DST_STEP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < C_OUT
    n, c3, a, b = _row_position(rm, Q, NDIM)
    ntaps = tl.load(ntaps_ptr + cls)
    tap_base = taps_ptr + cls * MAX_TAPS * (NDIM + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K = ntaps * C_IN
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            t = rk // C_IN
            c = rk % C_IN
            oy = tl.load(tap_base + t * (NDIM + 1), mask=k_ok, other=0)
            ox = tl.load(tap_base + t * (NDIM + 1) + 1, mask=k_ok, other=0)
            wt = tl.load(tap_base + t * (NDIM + 1) + 2, mask=k_ok, other=0)
            if NDIM == 3:
                sz = c3[:, None] * SRC_STEP + tl.load(tap_base + t * 4 + 3, mask=k_ok, other=0)[None, :]
            else:
                sz = 0
            row, nslot = _source_rows(nbr_ptr, n[:, None], sz, a[:, None] * SRC_STEP + oy[None, :],
                                   b[:, None] * SRC_STEP + ox[None, :], m_ok[:, None] & k_ok[None, :], P_SRC, NDIM)
            x = tl.load(src_ptr + row * C_IN + c[None, :], mask=nslot >= 0, other=0.0)
            w = tl.load(w_ptr + (wt * C_IN + c)[:, None] * C_OUT + rn[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    else:
        # one flat loop over (tap, channel block), so loads pipeline across taps
        k_blocks = tl.cdiv(C_IN, BLOCK_K)
        for kk in range(0, ntaps * k_blocks):
            t = kk // k_blocks
            rk = (kk - t * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = rk < C_IN
            oy = tl.load(tap_base + t * (NDIM + 1))
            ox = tl.load(tap_base + t * (NDIM + 1) + 1)
            wt = tl.load(tap_base + t * (NDIM + 1) + 2)
            if NDIM == 3:
                sz = c3 * SRC_STEP + tl.load(tap_base + t * 4 + 3)
            else:
                sz = 0
            row, nslot = _source_rows(nbr_ptr, n, sz, a * SRC_STEP + oy, b * SRC_STEP + ox, m_ok, P_SRC, NDIM)
            x = tl.load(src_ptr + row[:, None] * C_IN + rk[None, :], mask=(nslot >= 0)[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + (wt * C_IN + rk)[:, None] * C_OUT + rn[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dst_ptr.dtype.element_ty)
    if NDIM == 3:
        drow = (n.to(tl.int64) * (P_DST * P_DST * P_DST) + ((c3 * DST_STEP + rz) * P_DST + a * DST_STEP + ry) * P_DST
                + (b * DST_STEP + rx))
    else:
        drow = n.to(tl.int64) * (P_DST * P_DST) + (a * DST_STEP + ry) * P_DST + (b * DST_STEP + rx)
    tl.store(dst_ptr + drow[:, None] * C_OUT + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])
    if STATS:
        # statistics of the stored (rounded) values, as BatchNorm would read them
        y = tl.where(m_ok[:, None], out.to(tl.float32), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean = tl.sum(y, axis=0) / count
        d = tl.where(m_ok[:, None], y - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        tl.store(stats_ptr + pid_m * 2 * C_OUT + rn, mean, mask=n_ok)
        tl.store(stats_ptr + pid_m * 2 * C_OUT + C_OUT + rn, m2, mask=n_ok)


def _gemm_configs() -> list[triton.Config]:
    out = []
    for bn, bk, warps, stages in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3),
                                  (128, 64, 4, 4), (256, 64, 8, 3), (32, 32, 4, 4),
                                  (64, 32, 8, 3), (32, 16, 4, 4)]:  # the last two for FLAT_K
        out.append(config(warps, stages, BLOCK_M=GPU_STATS_BLOCK_M, BLOCK_N=bn, BLOCK_K=bk))
    return out  # autotuned on a GPU only, where FWD_BLOCK_M is GPU_STATS_BLOCK_M


FLAT_GATHER_PER_THREAD = 16
"""Most gathered source elements of a FLAT_K tile per thread, each with its own neighbour lookup.
At 32 (the old 4-warp fixed configs) 6 of 16 FLAT_K compiles for sm_90/sm_80 spilled; no kept
config at 16 or fewer does (benchmarks/kernel_compile.py, results/2026-11-26-static-sm90-sm80/)."""


def _gathered_per_thread(c: triton.Config) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)


def _fit_channels(configs, named_args) -> list[triton.Config]:
    """Configs whose N and K blocks are not far wider than the channels."""
    n_cap = max(32, triton.next_power_of_2(named_args["C_OUT"]))
    k_cap = max(32, triton.next_power_of_2(named_args["C_IN"]))
    return [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]


def _prune_tiles(configs, named_args, flat: bool, min_block_k: int) -> list[triton.Config]:
    """Channel fit; FLAT_K keeps tiles that do not spill; K blocks at least ``min_block_k`` (one stays)."""
    kept = [c for c in _fit_channels(configs, named_args) if c.kwargs["BLOCK_K"] >= min_block_k]
    if flat:
        kept = [c for c in kept if _gathered_per_thread(c) <= FLAT_GATHER_PER_THREAD]
    return kept or configs[:1]


def _prune_gemm(configs, named_args, **kwargs):
    """A per-tap K block (not FLAT_K) is at least 32 wide."""
    flat = kwargs.get("FLAT_K", False)
    return _prune_tiles(configs, named_args, flat, min_block_k=1 if flat else 32)


_GATHER_GEMM = TunedKernel(
    _gather_gemm_kernel, _gemm_configs(), key=["C_IN", "C_OUT", "M_KEY", "MAX_TAPS", "NDIM", "FLAT_K", "STATS"],
    prune=_prune_gemm,
    fixed=config(8, 3, BLOCK_M=FWD_BLOCK_M, BLOCK_N=64, BLOCK_K=32),  # spill-free in both K modes
    interp=config(BLOCK_M=FWD_BLOCK_M, BLOCK_N=128, BLOCK_K=64),
)


@triton.jit
def _wgrad_kernel(
    src_ptr, dy_ptr, out_ptr, nbr_ptr, taps_ptr,
    M, C_IN, C_OUT, Q, P_SRC, SRC_STEP, NUM_TAPS, ROWS_PER_SPLIT, M_KEY,
    NDIM: tl.constexpr, FLAT_K: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[split, tap*C_IN + ci, co] = sum over this split's rows m of gather(src)[m, tap, ci] * dy[m, co].

    Grid: (K blocks, C_OUT blocks, splits). Without FLAT_K a K block is one tap's
    C_IN block (one neighbour lookup per row); with FLAT_K it spans taps.
    ATOMIC adds into a single fp32 buffer instead of one slice per split.
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < C_OUT
    if FLAT_K:
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < NUM_TAPS * C_IN
        t = rk // C_IN
        c = rk % C_IN
        oy = tl.load(taps_ptr + t * (NDIM + 1), mask=k_ok, other=0)
        ox = tl.load(taps_ptr + t * (NDIM + 1) + 1, mask=k_ok, other=0)
        if NDIM == 3:
            oz = tl.load(taps_ptr + t * 4 + 3, mask=k_ok, other=0)
        krow = rk
    else:
        ci_blocks = tl.cdiv(C_IN, BLOCK_K)
        tap = pid_k // ci_blocks
        c = (pid_k % ci_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = c < C_IN
        oy = tl.load(taps_ptr + tap * (NDIM + 1))
        ox = tl.load(taps_ptr + tap * (NDIM + 1) + 1)
        if NDIM == 3:
            oz = tl.load(taps_ptr + tap * 4 + 3)
        krow = tap * C_IN + c
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        n, c3, a, b = _row_position(rm, Q, NDIM)
        if FLAT_K:
            if NDIM == 3:
                sz = c3[:, None] * SRC_STEP + oz[None, :]
            else:
                sz = 0
            row, nslot = _source_rows(nbr_ptr, n[:, None], sz, a[:, None] * SRC_STEP + oy[None, :],
                                   b[:, None] * SRC_STEP + ox[None, :], m_ok[:, None] & k_ok[None, :], P_SRC, NDIM)
            x = tl.load(src_ptr + row * C_IN + c[None, :], mask=nslot >= 0, other=0.0)
        else:
            if NDIM == 3:
                sz = c3 * SRC_STEP + oz
            else:
                sz = 0
            row, nslot = _source_rows(nbr_ptr, n, sz, a * SRC_STEP + oy, b * SRC_STEP + ox, m_ok, P_SRC, NDIM)
            x = tl.load(src_ptr + row[:, None] * C_IN + c[None, :], mask=(nslot >= 0)[:, None] & k_ok[None, :],
                        other=0.0)
        g = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * C_OUT + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
    mask = k_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + krow[:, None] * C_OUT + rn[None, :], acc, mask=mask)
    else:
        base = out_ptr + split.to(tl.int64) * NUM_TAPS * C_IN * C_OUT
        tl.store(base + krow[:, None] * C_OUT + rn[None, :], acc, mask=mask)


def _wgrad_configs() -> list[triton.Config]:
    out = []
    for bm, bk, bn, warps, stages in [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 8, 3),
                                      (64, 64, 128, 8, 3), (128, 128, 128, 8, 3), (32, 32, 64, 4, 4),
                                      (64, 64, 64, 8, 3), (32, 64, 64, 4, 3)]:
        out.append(config(warps, stages, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn))
    return out


def _prune_wgrad(configs, named_args, **kwargs):
    """A FLAT_K tile gathers BLOCK_M x BLOCK_K source elements, as in the forward GEMM."""
    return _prune_tiles(configs, named_args, kwargs.get("FLAT_K", False), min_block_k=1)


_WGRAD = TunedKernel(
    _wgrad_kernel, _wgrad_configs(), key=["C_IN", "C_OUT", "M_KEY", "NUM_TAPS", "NDIM", "FLAT_K"],
    fixed=config(8, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64),  # spill-free in both K modes
    interp=config(BLOCK_M=128, BLOCK_K=64, BLOCK_N=128),
    reset_to_zero=["out_ptr"], prune=_prune_wgrad,
)
WGRAD_MAX_BLOCK_M = 128  # ROWS_PER_SPLIT is a multiple of every tuned BLOCK_M


# --- geometry ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """One conv on patches of side ``p``: kernel, stride, padding, dilation (per axis: 2 for images, 3 for volumes)."""

    p: int
    kernel: tuple[int, ...]
    stride: int
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def q(self) -> int:
        """Output patch side."""
        return self.p // self.stride

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)


@dataclass(frozen=True)
class TapTable:
    taps: torch.Tensor  # (classes, max_taps, ndim + 1) int32: dy offset, dx offset, weight tap[, dz offset]
    counts: torch.Tensor  # (classes,) int32
    max_taps: int


_TAP_CACHE: dict = {}


def _axis_offsets_forward(k: int, pad: int, d: int) -> list[tuple[int, int]]:
    return [(kk * d - pad, kk) for kk in range(k)]


def _axis_offsets_dgrad(r: int, k: int, s: int, pad: int, d: int) -> list[tuple[int, int]]:
    """Taps of one axis that reach input coordinate s*a + r, with their dy offset (in output pixels)."""
    out = []
    for kk in range(k):
        t = r + pad - kk * d
        if t % s == 0:
            out.append((t // s, kk))
    return out


def _class_taps(per_axis: list[list[tuple[int, int]]], kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every combination of the axes' (offset, kernel index) pairs, leading axis outermost, as a tap-table row
    (dy, dx, flat weight tap[, dz]): the image rows keep their 3-column layout, volumes append the depth."""
    rows = []
    for combo in itertools.product(*per_axis):
        offsets = [o for o, _ in combo]
        tap = 0
        for (_, kk), k in zip(combo, kernel):
            tap = tap * k + kk
        rows.append((*offsets[-2:], tap, *offsets[:-2]))
    return rows


def _check_reach(geom: ConvGeometry, lo: int, hi: int, side: int, what: str) -> None:
    if lo < -side or hi >= 2 * side:
        raise ValueError(
            f"{BACKEND}: conv kernel {geom.kernel}, stride {geom.stride}, padding {geom.padding}, dilation "
            f"{geom.dilation} on patches of side {geom.p} reads {what} pixels {lo}..{hi}, beyond the neighbour "
            f"patches of side {side} (halo larger than the patch)")


def tap_table(geom: ConvGeometry, device: torch.device, transposed: bool) -> TapTable:
    """Tap table of the forward gather, or of the dgrad gather (one class per parity, s ** ndim classes)."""
    key = (geom, str(device), transposed)
    if key in _TAP_CACHE:
        return _TAP_CACHE[key]
    axes, s = list(zip(geom.kernel, geom.padding, geom.dilation)), geom.stride
    classes = []
    if not transposed:
        per_axis = [_axis_offsets_forward(k, pad, d) for k, pad, d in axes]
        classes.append(_class_taps(per_axis, geom.kernel))
        offs = [o for axis in per_axis for o, _ in axis]
        _check_reach(geom, min(offs), s * (geom.q - 1) + max(offs), geom.p, "input")
    else:
        for residues in itertools.product(range(s), repeat=geom.ndim):
            per_axis = [_axis_offsets_dgrad(r, k, s, pad, d) for r, (k, pad, d) in zip(residues, axes)]
            classes.append(_class_taps(per_axis, geom.kernel))
            offs = [o for axis in per_axis for o, _ in axis]
            if offs:
                _check_reach(geom, min(offs), geom.q - 1 + max(offs), geom.q, "output-gradient")
    max_taps = max(1, max(len(c) for c in classes))
    table = torch.zeros(len(classes), max_taps, geom.ndim + 1, dtype=torch.int32)
    for i, cls in enumerate(classes):
        if cls:
            table[i, :len(cls)] = torch.tensor(cls, dtype=torch.int32)
    counts = torch.tensor([len(c) for c in classes], dtype=torch.int32)
    out = TapTable(table.to(device), counts.to(device), max_taps)
    _TAP_CACHE[key] = out
    return out


# --- wrappers ------------------------------------------------------------------------


def _check_rows(name: str, rows: torch.Tensor, num_patches: int, side: int, ndim: int,
                channels: int | None = None) -> None:
    check_tensor(name, rows, dim=2)
    if rows.shape[0] != num_patches * side ** ndim:
        shape = "x".join([str(side)] * ndim)
        raise ValueError(f"{BACKEND}: {name} has {rows.shape[0]} rows, expected {num_patches} patches x "
                         f"{shape} = {num_patches * side ** ndim}")
    if channels is not None and rows.shape[1] != channels:
        raise ValueError(f"{BACKEND}: {name} has {rows.shape[1]} channels, expected {channels}")


def _check_nbr(nbr: torch.Tensor, num_patches: int, device: torch.device, ndim: int) -> None:
    check_tensor("neighbours", nbr, device=device, dtypes=(torch.int32,), dim=1)
    if nbr.numel() != num_patches * 3 ** ndim:
        raise ValueError(f"{BACKEND}: neighbours has {nbr.numel()} entries, expected {num_patches} x {3 ** ndim}")


def _flat_k(c_in: int) -> bool:
    """Walk taps and channels as one K axis when a channel block would be mostly masked."""
    return c_in < 16


def conv_forward(x: torch.Tensor, w_taps: torch.Tensor, bias: torch.Tensor | None, nbr: torch.Tensor,
                 geom: ConvGeometry, num_patches: int, stats: bool = False, tune: bool = True):
    """Output rows ``(N*q*q, C_out)`` of the masked conv, and per-block BN statistics if asked.

    ``x`` rows ``(N*p**ndim, C_in)``; ``w_taps`` ``(taps, C_in, C_out)`` in x's dtype.
    Returns ``(y, stats)`` with stats ``(row_blocks, 2, C_out)`` fp32 (mean, M2) or None.
    """
    nd = geom.ndim
    _check_rows("x", x, num_patches, geom.p, nd)
    check_tensor("weight", w_taps, device=x.device, dtypes=(x.dtype,), dim=3)
    c_in, c_out = x.shape[1], w_taps.shape[2]
    if w_taps.shape != (geom.taps, c_in, c_out):
        raise ValueError(f"{BACKEND}: weight taps have shape {tuple(w_taps.shape)}, expected "
                         f"({geom.taps}, {c_in}, C_out) for kernel {geom.kernel} and {c_in} input channels")
    if bias is not None:
        check_tensor("bias", bias, device=x.device, dtypes=None, dim=1)
        if bias.numel() != c_out:
            raise ValueError(f"{BACKEND}: bias has {bias.numel()} entries, expected {c_out}")
    _check_nbr(nbr, num_patches, x.device, nd)
    q = geom.q
    M = num_patches * q ** nd
    y = torch.empty(M, c_out, device=x.device, dtype=x.dtype)
    blocks = triton.cdiv(M, FWD_BLOCK_M)
    part = torch.empty(blocks, 2, c_out, device=x.device, dtype=torch.float32) if stats else None
    if M == 0:
        return y, part
    tab = tap_table(geom, x.device, transposed=False)
    grid = lambda meta: (blocks, triton.cdiv(c_out, meta["BLOCK_N"]), 1)  # noqa: E731
    _GATHER_GEMM.launch(
        grid, x, w_taps, bias if bias is not None else y, y, part if stats else y, nbr, tab.taps, tab.counts,
        M, c_in, c_out, q, geom.p, q, geom.stride, 1, tab.max_taps, size_key(M), NDIM=nd,
        HAS_BIAS=bias is not None, STATS=stats, FLAT_K=_flat_k(c_in), PRECISION=dot_precision(x.dtype), tune=tune,
        interp=dict(BLOCK_N=interp_block(c_out, hi=512),
                    BLOCK_K=interp_block(geom.taps * c_in if _flat_k(c_in) else c_in)))
    return y, part


def conv_dgrad(dy: torch.Tensor, w_taps_t: torch.Tensor, nbr: torch.Tensor, geom: ConvGeometry,
               num_patches: int, tune: bool = True) -> torch.Tensor:
    """Input gradient rows ``(N*p**ndim, C_in)`` from ``dy`` ``(N*q**ndim, C_out)``.

    ``w_taps_t`` is the weight as ``(taps, C_out, C_in)`` in dy's dtype. Every input
    row belongs to one parity class and is written exactly once (no atomics).
    """
    nd = geom.ndim
    _check_rows("grad_output", dy, num_patches, geom.q, nd)
    check_tensor("weight", w_taps_t, device=dy.device, dtypes=(dy.dtype,), dim=3)
    c_out, c_in = w_taps_t.shape[1], w_taps_t.shape[2]
    if w_taps_t.shape[0] != geom.taps or dy.shape[1] != c_out:
        raise ValueError(f"{BACKEND}: transposed weight {tuple(w_taps_t.shape)} does not fit grad_output "
                         f"{tuple(dy.shape)} and kernel {geom.kernel}")
    _check_nbr(nbr, num_patches, dy.device, nd)
    s, q, p = geom.stride, geom.q, geom.p
    dx = torch.empty(num_patches * p ** nd, c_in, device=dy.device, dtype=dy.dtype)
    if num_patches == 0:
        return dx
    tab = tap_table(geom, dy.device, transposed=True)
    M = num_patches * q ** nd  # rows per parity class
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]), s ** nd)  # noqa: E731
    _GATHER_GEMM.launch(
        grid, dy, w_taps_t, dx, dx, dx, nbr, tab.taps, tab.counts,
        M, c_out, c_in, q, q, p, 1, s, tab.max_taps, size_key(M), NDIM=nd,
        HAS_BIAS=False, STATS=False, FLAT_K=False, PRECISION=dot_precision(dy.dtype), tune=tune,
        interp=dict(BLOCK_M=interp_block(M, hi=1024), BLOCK_N=interp_block(c_in, hi=512), BLOCK_K=interp_block(c_out)))
    return dx


def conv_wgrad(x: torch.Tensor, dy: torch.Tensor, nbr: torch.Tensor, geom: ConvGeometry, num_patches: int,
               deterministic: bool) -> torch.Tensor:
    """Weight gradient as fp32 ``(taps, C_in, C_out)``: a GEMM over the output rows per tap.

    Rows are split so that enough programs run; deterministic mode writes one slice
    per split and sums them in a fixed order, fast mode adds them with fp32 atomics.
    """
    nd = geom.ndim
    _check_rows("x", x, num_patches, geom.p, nd)
    _check_rows("grad_output", dy, num_patches, geom.q, nd)
    if dy.dtype != x.dtype:
        raise TypeError(f"{BACKEND}: grad_output dtype {dy.dtype} differs from the saved input's {x.dtype}")
    _check_nbr(nbr, num_patches, x.device, nd)
    c_in, c_out, T = x.shape[1], dy.shape[1], geom.taps
    M = dy.shape[0]
    if M == 0:
        return torch.zeros(T, c_in, c_out, device=x.device, dtype=torch.float32)
    flat = _flat_k(c_in)
    tab = tap_table(geom, x.device, transposed=False)
    meta = _WGRAD.meta()
    tiles = (triton.cdiv(T * c_in, meta["BLOCK_K"]) if flat else T * triton.cdiv(c_in, meta["BLOCK_K"]))
    tiles *= triton.cdiv(c_out, meta["BLOCK_N"])
    splits, rows_per_split = row_splits(M, tiles, x.device, WGRAD_MAX_BLOCK_M)
    atomic = splits > 1 and not deterministic
    if atomic:
        out = torch.zeros(T, c_in, c_out, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(splits, T, c_in, c_out, device=x.device, dtype=torch.float32)
    tune = not deterministic

    def grid(meta):
        kb = triton.cdiv(T * c_in, meta["BLOCK_K"]) if flat else T * triton.cdiv(c_in, meta["BLOCK_K"])
        return (kb, triton.cdiv(c_out, meta["BLOCK_N"]), splits)

    _WGRAD.launch(grid, x, dy, out, nbr, tab.taps, M, c_in, c_out, geom.q, geom.p, geom.stride, T,
                  rows_per_split, size_key(M), NDIM=nd, FLAT_K=flat, ATOMIC=atomic, PRECISION=dot_precision(x.dtype),
                  tune=tune, interp=dict(BLOCK_M=interp_block(M, hi=1024), BLOCK_N=interp_block(c_out, hi=512),
                                         BLOCK_K=interp_block(T * c_in if flat else c_in)))
    if atomic:
        return out
    if splits == 1:
        return out[0]
    return sum_leading(out.view(splits, -1)).view(T, c_in, c_out)


# --- autograd ------------------------------------------------------------------------


def weight_taps(weight: torch.Tensor, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """``(C_out, C_in, *kernel)`` -> ``(taps, C_in, C_out)`` (or ``(taps, C_out, C_in)``) in ``dtype``."""
    w = weight.detach().to(dtype)
    kernel_axes = tuple(range(2, w.dim()))
    w = w.permute(*kernel_axes, *((0, 1) if transposed else (1, 0)))
    return w.reshape(-1, w.shape[-2], w.shape[-1]).contiguous()


class SparseConvFunction(torch.autograd.Function):
    """Masked conv (images or volumes) on packed rows with Triton forward, input-gradient and weight-gradient kernels.

    Returns ``(y, stats)``: stats are the per-block BN statistics of y (or None),
    not differentiable; the BatchNorm that follows may use them instead of re-reading y.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, nbr, geom, num_patches, want_stats, deterministic):
        w_taps = weight_taps(weight, x.dtype, transposed=False)
        b = None if bias is None else bias.detach()
        y, stats = conv_forward(x, w_taps, b, nbr, geom, num_patches, stats=want_stats, tune=not deterministic)
        ctx.save_for_backward(x, weight)
        ctx.nbr, ctx.geom, ctx.num_patches, ctx.deterministic = nbr, geom, num_patches, deterministic
        ctx.bias_dtype = None if bias is None else bias.dtype
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dstats):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w_t = weight_taps(weight, x.dtype, transposed=True)
            dx = conv_dgrad(dy, w_t, ctx.nbr, ctx.geom, ctx.num_patches, tune=not ctx.deterministic)
        if ctx.needs_input_grad[1]:
            g = conv_wgrad(x, dy, ctx.nbr, ctx.geom, ctx.num_patches, ctx.deterministic)
            nd = ctx.geom.ndim
            g = g.view(*ctx.geom.kernel, g.shape[1], g.shape[2])
            dw = g.permute(nd + 1, nd, *range(nd)).to(weight.dtype).contiguous()
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = column_sum(dy).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None
