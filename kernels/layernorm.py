"""LayerNorm over the channels of each packed row (ConvNeXt's norm), forward and backward.

A row holds one visible position's ``C`` channels, so LayerNorm is row-local: a program
owns ``BLOCK_M`` rows and walks their channels in blocks of ``BLOCK_C`` (any C, bounded
registers). Statistics are fp32: one pass combines each channel block's mean and M2
into the row's (Chan's formula), a second pass normalises. The backward reads dy and x
twice (row sums, then dx) and writes per program the partial weight and bias gradients,
summed in a fixed order (deterministic, no atomics).

``_chan_update`` and ``_normalize_rows`` are shared with the fused depthwise conv +
LayerNorm kernel (``depthwise.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .reduce import sum_leading
from .runtime import BACKEND, TunedKernel, check_tensor, config, interp_block


@triton.jit
def _chan_update(mean, m2, x, c_ok, c0, C, BLOCK_C: tl.constexpr):
    """Fold one channel block ``x`` (BLOCK_M, BLOCK_C; fp32, masked lanes any value) into each row's
    running (mean, M2) over the ``c0`` channels seen before it."""
    nb = tl.minimum(C - c0, BLOCK_C) * 1.0
    na = c0 * 1.0
    xb = tl.where(c_ok[None, :], x, 0.0)
    bmean = tl.sum(xb, axis=1) / nb
    d = tl.where(c_ok[None, :], xb - bmean[:, None], 0.0)
    delta = bmean - mean
    total = na + nb
    return mean + delta * (nb / total), m2 + tl.sum(d * d, axis=1) + delta * delta * (na * nb / total)


@triton.jit
def _normalize_rows(x_ptr, w_ptr, b_ptr, y_ptr, rows, m_ok, mean, rstd, C,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[rows] = (x[rows] - mean) * rstd * w + b, channel block by channel block."""
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        mask = m_ok[:, None] & c_ok[None, :]
        offs = rows[:, None] * C + rc[None, :]
        y = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = LayerNorm(x) over the C channels of each of the program's BLOCK_M rows; mean, 1/std stored."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = rm.to(tl.int64)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        x = tl.load(x_ptr + rows[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        mean, m2 = _chan_update(mean, m2, x, c_ok, c0, C, BLOCK_C)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(mean_ptr + rm, mean, mask=m_ok)
    tl.store(rstd_ptr + rm, rstd, mask=m_ok)
    _normalize_rows(x_ptr, w_ptr, b_ptr, y_ptr, rows, m_ok, mean, rstd, C, HAS_W, HAS_B, BLOCK_C)


@triton.jit
def _bwd_block(dy_ptr, x_ptr, w_ptr, rows, m_ok, mean, rstd, C, c0, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One channel block of the backward: (dy, xhat, g = dy * w) in fp32, its channels and offsets."""
    rc = c0 + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mask = m_ok[:, None] & c_ok[None, :]
    offs = rows[:, None] * C + rc[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, g, rc, c_ok, mask, offs


@triton.jit
def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, M, C,
                   HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_PARAMS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; part[program] = (sum dy * xhat,
    sum dy) over the program's rows (the weight and bias gradients before the fixed-order sum)."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = rm.to(tl.int64)
    mean = tl.load(mean_ptr + rm, mask=m_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rm, mask=m_ok, other=0.0)
    s_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        dy, xhat, g, rc, c_ok, mask, offs = _bwd_block(dy_ptr, x_ptr, w_ptr, rows, m_ok, mean, rstd, C, c0,
                                                       HAS_W, BLOCK_C)
        s_g += tl.sum(g, axis=1)
        s_gx += tl.sum(g * xhat, axis=1)
        if NEED_PARAMS:
            tl.store(part_ptr + pid * 2 * C + rc, tl.sum(dy * xhat, axis=0), mask=c_ok)
            tl.store(part_ptr + pid * 2 * C + C + rc, tl.sum(dy, axis=0), mask=c_ok)
    if NEED_DX:
        s_g = s_g / C
        s_gx = s_gx / C
        for c0 in range(0, C, BLOCK_C):
            dy, xhat, g, rc, c_ok, mask, offs = _bwd_block(dy_ptr, x_ptr, w_ptr, rows, m_ok, mean, rstd, C, c0,
                                                           HAS_W, BLOCK_C)
            dx = (g - s_g[:, None] - xhat * s_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_FWD = TunedKernel(_ln_fwd_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=16, BLOCK_C=128),
                   interp=config(BLOCK_M=256, BLOCK_C=128))
_BWD = TunedKernel(_ln_bwd_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=16, BLOCK_C=128),
                   interp=config(BLOCK_M=256, BLOCK_C=128))


def interp_rows(C: int) -> dict:
    """Under the interpreter: channel blocks of up to 256 (wider rows still take the multi-block path)
    and up to 2^16 elements per program."""
    bc = interp_block(C, hi=256)
    return dict(BLOCK_C=bc, BLOCK_M=interp_block((1 << 16) // bc, hi=512))


def check_affine(name: str, t: torch.Tensor | None, C: int, device: torch.device) -> None:
    if t is None:
        return
    check_tensor(name, t, device=device, dtypes=None, dim=1)
    if t.numel() != C:
        raise ValueError(f"{BACKEND}: {name} has {t.numel()} entries, expected one per channel ({C})")


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """``(y, mean, rstd)``: LayerNorm of the rows ``(M, C)`` in x's dtype, fp32 row statistics ``(M,)``."""
    check_tensor("x", x, dim=2)
    M, C = x.shape
    check_affine("weight", weight, C, x.device)
    check_affine("bias", bias, C, x.device)
    y = torch.empty_like(x)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if M and C:
        _FWD.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), x, weight if weight is not None else mean,
                    bias if bias is not None else mean, y, mean, rstd, M, C, float(eps),
                    HAS_W=weight is not None, HAS_B=bias is not None, interp=interp_rows(C))
    return y, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                        rstd: torch.Tensor, need_dx: bool = True, need_params: bool = True):
    """``(dx, dweight, dbias)`` of ``layer_norm_forward``; the parameter gradients fp32 ``(C,)`` (or None)."""
    check_tensor("grad_output", dy, device=x.device, dim=2)
    if dy.shape != x.shape:
        raise ValueError(f"{BACKEND}: grad_output has shape {tuple(dy.shape)}, expected {tuple(x.shape)}")
    M, C = x.shape
    dx = torch.empty_like(x) if need_dx else None
    if M == 0 or C == 0:
        z = torch.zeros(C, device=x.device, dtype=torch.float32)
        return dx, (z if need_params else None), (z.clone() if need_params else None)
    meta = _BWD.meta(interp_rows(C))
    programs = triton.cdiv(M, meta["BLOCK_M"])
    part = torch.empty(programs, 2, C, device=x.device, dtype=torch.float32) if need_params else None
    _BWD.launch(lambda meta: (programs,), dy, x, weight if weight is not None else mean, mean, rstd,
                dx if need_dx else dy, part if need_params else mean, M, C, HAS_W=weight is not None,
                NEED_DX=need_dx, NEED_PARAMS=need_params, interp=interp_rows(C))
    if not need_params:
        return dx, None, None
    sums = part[0] if programs == 1 else sum_leading(part.view(programs, 2 * C)).view(2, C)
    return dx, sums[0], sums[1]


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the channels of packed rows with Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        w = None if weight is None else weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        y, mean, rstd = layer_norm_forward(x, w, b, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = layer_norm_backward(dy.to(x.dtype).contiguous(), x, w, mean, rstd, need[0], any(need[1:3]))
        return dx, cast_grad(dw, ctx.dtypes[0], need[1]), cast_grad(db, ctx.dtypes[1], need[2]), None


def cast_grad(g: torch.Tensor | None, dtype: torch.dtype | None, needed: bool) -> torch.Tensor | None:
    """A parameter's fp32 gradient in the parameter's dtype, or None (no parameter, or not asked for)."""
    return None if g is None or dtype is None or not needed else g.to(dtype)
