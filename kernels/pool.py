"""Max pooling on packed active patches (ResNet's 3x3/2 stem pool, any aligned k/s/pad), images or volumes.

Masked neighbour pixels read 0 and pixels beyond the image read -inf (PyTorch's
padding), exactly as the dense reference pools a map that is zero where masked.
The forward stores the winning tap per output element (int8); the backward is a
gather: each input pixel collects dy from the outputs whose winner it was, in a
fixed tap order (no atomics, deterministic). ``NDIM`` 3 pools k x k x k windows of volumes
through the (N, 3, 3, 3) neighbour table.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .index import _row_position, _source_rows
from .runtime import BACKEND, TunedKernel, check_tensor, config


@triton.jit
def _max_over_plane(x_ptr, nbr_ptr, n, sz, a, b, rc, m_ok, c_ok, best, arg, tap0, C, P, STRIDE, PAD,
                    K: tl.constexpr, NDIM: tl.constexpr):
    """Fold the K x K taps of one window plane (source depth sz, tap numbers from tap0) into the running
    maximum ``best`` and its tap ``arg``."""
    for ky in tl.static_range(K):
        for kx in tl.static_range(K):
            sy = a * STRIDE + ky - PAD
            sx = b * STRIDE + kx - PAD
            row, nslot = _source_rows(nbr_ptr, n, sz, sy, sx, m_ok, P, NDIM)
            v = tl.load(x_ptr + row[:, None] * C + rc[None, :], mask=(nslot >= 0)[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            v = tl.where((nslot == -2)[:, None], float("-inf"), v)  # beyond the image: padding
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            arg = tl.where(take, tap0 + ky * K + kx, arg)
    return best, arg


@triton.jit
def _maxpool_fwd_kernel(x_ptr, y_ptr, arg_ptr, nbr_ptr, M, C, Q, P, STRIDE, PAD,
                        K: tl.constexpr, NDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[row, c] = max over the K x K (x K) window; arg = index of the first maximum (NaN wins, like torch)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    n, c3, a, b = _row_position(rm, Q, NDIM)
    best = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    if NDIM == 3:
        # a run-time loop over the planes: 27 unrolled taps kept every tile in flight and spilled (kernel_compile)
        for kz in range(K):
            best, arg = _max_over_plane(x_ptr, nbr_ptr, n, c3 * STRIDE + kz - PAD, a, b, rc, m_ok, c_ok, best, arg,
                                        kz * K * K, C, P, STRIDE, PAD, K, NDIM)
    else:
        best, arg = _max_over_plane(x_ptr, nbr_ptr, n, 0, a, b, rc, m_ok, c_ok, best, arg, 0, C, P, STRIDE, PAD,
                                    K, NDIM)
    mask = m_ok[:, None] & c_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * C + rc[None, :]
    tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(arg_ptr + offs, arg.to(tl.int8), mask=mask)


@triton.jit
def _maxpool_bwd_kernel(dy_ptr, arg_ptr, dx_ptr, nbr_ptr, M, C, Q, P, STRIDE, PAD,
                        K: tl.constexpr, NDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[input row, c] = sum of dy over the windows containing the pixel whose winner it was."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    n, iz, iy, ix = _row_position(rm, P, NDIM)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kz in tl.static_range(K if NDIM == 3 else 1):
        if NDIM == 3:
            tz = iz + PAD - kz + STRIDE * Q  # shifted to stay non-negative
        for ky in tl.static_range(K):
            ty = iy + PAD - ky + STRIDE * Q
            for kx in tl.static_range(K):
                tx = ix + PAD - kx + STRIDE * Q
                hit = m_ok & (ty % STRIDE == 0) & (tx % STRIDE == 0)
                if NDIM == 3:
                    hit = hit & (tz % STRIDE == 0)
                    sz = tz // STRIDE - Q
                else:
                    sz = 0
                row, nslot = _source_rows(nbr_ptr, n, sz, ty // STRIDE - Q, tx // STRIDE - Q, hit, Q, NDIM)
                mask = (nslot >= 0)[:, None] & c_ok[None, :]
                offs = row[:, None] * C + rc[None, :]
                won = tl.load(arg_ptr + offs, mask=mask, other=-1).to(tl.int32) == (kz * K + ky) * K + kx
                g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += tl.where(won, g, 0.0)
    mask = m_ok[:, None] & c_ok[None, :]
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


# 8 warps: 16 elements of the 9-tap window per thread; with 4 warps fp32 spilled (benchmarks/kernel_compile.py)
_ROWWISE = dict(fixed=config(8, 2, BLOCK_M=64, BLOCK_C=64), interp=config(BLOCK_M=256, BLOCK_C=64))
_FWD = TunedKernel(_maxpool_fwd_kernel, [], key=[], **_ROWWISE)
_BWD = TunedKernel(_maxpool_bwd_kernel, [], key=[], **_ROWWISE)


def _check_geometry(p: int, k: int, s: int, pad: int, ndim: int) -> int:
    q = p // s
    if s < 1 or p % s or (p + 2 * pad - k) // s + 1 != q:
        raise ValueError(f"{BACKEND}: max pool kernel {k}, stride {s}, padding {pad} does not map patches of side "
                         f"{p} onto side {q}")
    if pad > p or k - 1 - pad + s * (q - 1) >= 2 * p or k ** ndim > 127:  # the winning tap is stored as int8
        raise ValueError(f"{BACKEND}: max pool kernel {k} with padding {pad} reaches beyond the neighbour patches "
                         f"of side {p}")
    return q


def maxpool_forward(x: torch.Tensor, nbr: torch.Tensor, num_patches: int, p: int, k: int, s: int, pad: int,
                    ndim: int = 2):
    """``(y, arg)``: pooled rows ``(N*q**ndim, C)`` and the int8 winning tap of each element."""
    check_tensor("x", x, dim=2)
    check_tensor("neighbours", nbr, device=x.device, dtypes=(torch.int32,), dim=1)
    if x.shape[0] != num_patches * p ** ndim:
        raise ValueError(f"{BACKEND}: x has {x.shape[0]} rows, expected {num_patches} patches of "
                         f"{'x'.join([str(p)] * ndim)}")
    if nbr.numel() != num_patches * 3 ** ndim:
        raise ValueError(f"{BACKEND}: neighbours has {nbr.numel()} entries, expected {num_patches} x {3 ** ndim}")
    q = _check_geometry(p, k, s, pad, ndim)
    M, C = num_patches * q ** ndim, x.shape[1]
    y = torch.empty(M, C, device=x.device, dtype=x.dtype)
    arg = torch.empty(M, C, device=x.device, dtype=torch.int8)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        _FWD.launch(grid, x, y, arg, nbr, M, C, q, p, s, pad, K=k, NDIM=ndim)
    return y, arg


def maxpool_backward(dy: torch.Tensor, arg: torch.Tensor, nbr: torch.Tensor, num_patches: int, p: int, k: int,
                     s: int, pad: int, ndim: int = 2) -> torch.Tensor:
    """Input-gradient rows ``(N*p**ndim, C)`` of ``maxpool_forward``."""
    check_tensor("grad_output", dy, dim=2)
    check_tensor("argmax", arg, device=dy.device, dtypes=(torch.int8,), dim=2)
    if arg.shape != dy.shape:
        raise ValueError(f"{BACKEND}: argmax shape {tuple(arg.shape)} differs from grad_output {tuple(dy.shape)}")
    q = _check_geometry(p, k, s, pad, ndim)
    M, C = num_patches * p ** ndim, dy.shape[1]
    dx = torch.empty(M, C, device=dy.device, dtype=dy.dtype)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
        _BWD.launch(grid, dy, arg, dx, nbr, M, C, q, p, s, pad, K=k, NDIM=ndim)
    return dx


class MaxPoolFunction(torch.autograd.Function):
    """Masked max pool of images (``ndim`` 2) or volumes (3) on packed rows."""

    @staticmethod
    def forward(ctx, x, nbr, num_patches, p, k, s, pad, ndim):
        y, arg = maxpool_forward(x, nbr, num_patches, p, k, s, pad, ndim)
        ctx.save_for_backward(arg)
        ctx.nbr, ctx.geom = nbr, (num_patches, p, k, s, pad, ndim)
        ctx.mark_non_differentiable(arg)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (arg,) = ctx.saved_tensors
        dx = maxpool_backward(dy.contiguous(), arg, ctx.nbr, *ctx.geom)
        return dx, None, None, None, None, None, None, None
