"""BatchNorm over packed rows: one statistics pass, one fused apply pass, and their backward.

- statistics: ``_partial_stats_kernel`` writes per block of rows the mean and M2
  of each channel (or the conv epilogue already did, see conv.py); ``_finalize_kernel``
  combines the blocks (Chan's parallel formula, fixed order: deterministic) into
  mean and 1/std and updates the running statistics like torch (unbiased variance,
  momentum) in the same launch;
- apply: ``_apply_kernel`` computes ``relu?(bn1(x1) [+ bn2(x2)] [+ residual])`` in one
  pass: a bottleneck's ``relu(bn3(conv3) + bn_ds(conv_ds))`` is a single kernel;
- backward: ``_bwd_reduce_kernel`` reads dy (masked by the saved output where a
  ReLU was fused) once for ``sum dz`` and ``sum dz * xhat`` of each BN, and
  ``_bwd_dx_kernel`` writes dx1, dx2 and the residual gradient in one more pass.

Kernels compute, the backend communicates: the statistics arrive as a
``ctssl.sparse.norm_stats.NormStats`` (mean, invstd, count, batch), and between the
two backward passes its ``reduce_grad_sums`` is the one place a synchronized
BatchNorm's sums cross ranks. Nothing here knows about process groups.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .reduce import sum_leading
from .runtime import BACKEND, INTERPRET, STATS_BLOCK_M, TunedKernel, check_tensor, config, interp_block, num_sms

if TYPE_CHECKING:
    from ctssl.sparse.norm_stats import NormStats


@triton.jit
def _partial_stats_kernel(x_ptr, part_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[block, 0, c] = mean, part[block, 1, c] = sum of squared deviations, over the block's rows."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    d = tl.where(m_ok[:, None], x - mean[None, :], 0.0)
    tl.store(part_ptr + pid_m * 2 * C + rc, mean, mask=c_ok)
    tl.store(part_ptr + pid_m * 2 * C + C + rc, tl.sum(d * d, axis=0), mask=c_ok)


@triton.jit
def _finalize_kernel(part_ptr, mean_ptr, invstd_ptr, var_ptr, rmean_ptr, rvar_ptr, M, C, BLOCKS, momentum, eps,
                     PART_BLOCK_M: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Combine block (count, mean, M2) into mean, biased var, 1/std; update running stats if UPDATE.

    Two passes over the blocks: the overall mean, then M2 = sum(M2_i + n_i (mean_i - mean)^2).
    """
    pid_c = tl.program_id(0)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    total = M * 1.0  # (M may arrive as a constexpr 1)
    s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, BLOCKS, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        p_ok = rp < BLOCKS
        cnt = tl.minimum(M - rp * PART_BLOCK_M, PART_BLOCK_M).to(tl.float32)
        cnt = tl.where(p_ok, cnt, 0.0)
        mu = tl.load(part_ptr + rp[:, None] * 2 * C + rc[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        s += tl.sum(mu * cnt[:, None], axis=0)
    mean = s / total
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, BLOCKS, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        p_ok = rp < BLOCKS
        cnt = tl.minimum(M - rp * PART_BLOCK_M, PART_BLOCK_M).to(tl.float32)
        cnt = tl.where(p_ok, cnt, 0.0)
        mask = p_ok[:, None] & c_ok[None, :]
        mu = tl.load(part_ptr + rp[:, None] * 2 * C + rc[None, :], mask=mask, other=0.0)
        q = tl.load(part_ptr + rp[:, None] * 2 * C + C + rc[None, :], mask=mask, other=0.0)
        d = mu - mean[None, :]
        m2 += tl.sum(q + cnt[:, None] * d * d, axis=0)
    var = m2 / total
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(var_ptr + rc, var, mask=c_ok)
    tl.store(invstd_ptr + rc, 1.0 / tl.sqrt(var + eps), mask=c_ok)
    if UPDATE:
        rm = tl.load(rmean_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        unbiased = m2 / (total - 1.0)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(rmean_ptr + rc, rm.to(rmean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rvar_ptr + rc, rv.to(rvar_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _normalize(x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, offs, mask, rc, c_ok,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _apply_kernel(x1_ptr, mean1_ptr, invstd1_ptr, w1_ptr, b1_ptr,
                  x2_ptr, mean2_ptr, invstd2_ptr, w2_ptr, b2_ptr, res_ptr, y_ptr, M, C,
                  HAS_W1: tl.constexpr, HAS_B1: tl.constexpr, HAS_BN2: tl.constexpr, HAS_W2: tl.constexpr,
                  HAS_B2: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = relu?(bn1(x1) [+ bn2(x2)] [+ res]) over a (BLOCK_M, BLOCK_C) tile."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mask = (rm < M)[:, None] & c_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * C + rc[None, :]
    y = _normalize(x1_ptr, mean1_ptr, invstd1_ptr, w1_ptr, b1_ptr, offs, mask, rc, c_ok, HAS_W1, HAS_B1)
    if HAS_BN2:
        y += _normalize(x2_ptr, mean2_ptr, invstd2_ptr, w2_ptr, b2_ptr, offs, mask, rc, c_ok, HAS_W2, HAS_B2)
    if HAS_RES:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, y_ptr, x1_ptr, mean1_ptr, invstd1_ptr, x2_ptr, mean2_ptr, invstd2_ptr, part_ptr,
                       M, C, ROWS_PER_PROGRAM, RELU: tl.constexpr, HAS_BN2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[p, k, c] over program p's rows: k=0 sum dz, k=1 sum dz*xhat1, k=2 sum dz*xhat2.

    dz = dy, zeroed where the saved output y <= 0 when a ReLU was fused. Each
    program loops over ROWS_PER_PROGRAM rows, so few partials are left to sum.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mean1 = tl.load(mean1_ptr + rc, mask=c_ok, other=0.0)
    invstd1 = tl.load(invstd1_ptr + rc, mask=c_ok, other=0.0)
    mean2 = tl.load(mean2_ptr + rc, mask=c_ok, other=0.0)  # (the first BN's when there is no second)
    invstd2 = tl.load(invstd2_ptr + rc, mask=c_ok, other=0.0)
    s_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = pid_m * ROWS_PER_PROGRAM
    end = tl.minimum(M, start + ROWS_PER_PROGRAM)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask = (rm < end)[:, None] & c_ok[None, :]
        offs = rm.to(tl.int64)[:, None] * C + rc[None, :]
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.where(y > 0.0, dz, 0.0)
        x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s_dz += tl.sum(dz, axis=0)
        s_1 += tl.sum(dz * ((x1 - mean1[None, :]) * invstd1[None, :]), axis=0)
        if HAS_BN2:
            x2 = tl.load(x2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s_2 += tl.sum(dz * ((x2 - mean2[None, :]) * invstd2[None, :]), axis=0)
    base = part_ptr + pid_m * 3 * C + rc
    tl.store(base, s_dz, mask=c_ok)
    tl.store(base + C, s_1, mask=c_ok)
    tl.store(base + 2 * C, s_2, mask=c_ok)


@triton.jit
def _input_grad(dz, x_ptr, mean_ptr, invstd_ptr, w_ptr, gsum_ptr, gdot_ptr, inv_n, offs, mask, rc, c_ok,
                HAS_W: tl.constexpr, BATCH: tl.constexpr):
    """dx of one BN from dz: with batch statistics (dz - mean(dz) - xhat*mean(dz*xhat)) * invstd * w."""
    invstd = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    if BATCH:
        mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)
        gsum = tl.load(gsum_ptr + rc, mask=c_ok, other=0.0) * inv_n
        gdot = tl.load(gdot_ptr + rc, mask=c_ok, other=0.0) * inv_n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        return (dz - gsum[None, :] - xhat * gdot[None, :]) * scale[None, :]
    return dz * scale[None, :]


@triton.jit
def _bwd_dx_kernel(dy_ptr, y_ptr, x1_ptr, mean1_ptr, invstd1_ptr, w1_ptr, x2_ptr, mean2_ptr, invstd2_ptr, w2_ptr,
                   sums_ptr, dx1_ptr, dx2_ptr, dres_ptr, M, C, inv_n1, inv_n2,
                   RELU: tl.constexpr, HAS_W1: tl.constexpr, BATCH1: tl.constexpr, NEED_DX1: tl.constexpr,
                   HAS_BN2: tl.constexpr, HAS_W2: tl.constexpr, BATCH2: tl.constexpr, NEED_DX2: tl.constexpr,
                   NEED_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx1 (and dx2, d residual) from dy in one pass; sums = (3, C) [sum dz, sum dz*xhat1, sum dz*xhat2]."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mask = (rm < M)[:, None] & c_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * C + rc[None, :]
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(y > 0.0, dz, 0.0)
    if NEED_DRES:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if NEED_DX1:
        dx1 = _input_grad(dz, x1_ptr, mean1_ptr, invstd1_ptr, w1_ptr, sums_ptr, sums_ptr + C, inv_n1,
                          offs, mask, rc, c_ok, HAS_W1, BATCH1)
        tl.store(dx1_ptr + offs, dx1.to(dx1_ptr.dtype.element_ty), mask=mask)
    if HAS_BN2:
        if NEED_DX2:
            dx2 = _input_grad(dz, x2_ptr, mean2_ptr, invstd2_ptr, w2_ptr, sums_ptr, sums_ptr + 2 * C, inv_n2,
                              offs, mask, rc, c_ok, HAS_W2, BATCH2)
            tl.store(dx2_ptr + offs, dx2.to(dx2_ptr.dtype.element_ty), mask=mask)


_ROWWISE = dict(fixed=config(4, 2, BLOCK_M=64, BLOCK_C=64), interp=config(BLOCK_M=256, BLOCK_C=128))
_PARTIAL_STATS = TunedKernel(_partial_stats_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=STATS_BLOCK_M, BLOCK_C=32),
                             interp=config(BLOCK_M=STATS_BLOCK_M, BLOCK_C=128))
_FINALIZE = TunedKernel(_finalize_kernel, [], key=[], fixed=config(4, 2, BLOCK_P=128, BLOCK_C=32),
                        interp=config(BLOCK_P=256, BLOCK_C=256))
_APPLY = TunedKernel(_apply_kernel, [], key=[], **_ROWWISE)
_BWD_REDUCE = TunedKernel(_bwd_reduce_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=128, BLOCK_C=32),
                          interp=config(BLOCK_M=256, BLOCK_C=128))
_BWD_DX = TunedKernel(_bwd_dx_kernel, [], key=[], **_ROWWISE)


# --- statistics ----------------------------------------------------------------------


def partial_stats(x: torch.Tensor) -> torch.Tensor:
    """Per block of ``STATS_BLOCK_M`` rows: ``(blocks, 2, C)`` fp32 mean and M2 of each channel."""
    check_tensor("x", x, dim=2)
    M, C = x.shape
    blocks = triton.cdiv(M, STATS_BLOCK_M)
    part = torch.empty(blocks, 2, C, device=x.device, dtype=torch.float32)
    if blocks:
        _PARTIAL_STATS.launch(lambda meta: (blocks, triton.cdiv(C, meta["BLOCK_C"])), x, part, M, C,
                              interp=dict(BLOCK_C=interp_block(C, hi=512)))
    return part


def finalize_stats(part: torch.Tensor, M: int, running_mean, running_var, momentum: float, eps: float,
                   update: bool):
    """``(mean, invstd, var)`` fp32 from block partials of M rows; running stats updated in place if ``update``
    (torch's rule, as ``ctssl.sparse.norm_stats.update_running``, fused into this launch)."""
    check_tensor("partials", part, dtypes=(torch.float32,), dim=3)
    blocks, _, C = part.shape
    if blocks != triton.cdiv(M, STATS_BLOCK_M):
        raise ValueError(f"{BACKEND}: {blocks} statistics blocks do not cover {M} rows of {STATS_BLOCK_M}")
    if update:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            check_tensor(name, t, device=part.device, dtypes=None, dim=1)
            if t.numel() != C:
                raise ValueError(f"{BACKEND}: {name} has {t.numel()} entries, expected {C}")
    mean = torch.empty(C, device=part.device, dtype=torch.float32)
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    _FINALIZE.launch(lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),), part, mean, invstd, var,
                     running_mean if update else mean, running_var if update else mean, M, C, blocks,
                     float(momentum), float(eps), PART_BLOCK_M=STATS_BLOCK_M, UPDATE=update,
                     interp=dict(BLOCK_C=interp_block(C, hi=2048), BLOCK_P=interp_block(blocks, hi=64)))
    return mean, invstd, var


# --- apply and backward --------------------------------------------------------------


def _rowwise_grid(M: int, C: int, kernel: TunedKernel):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))


def _interp_tile(M: int, C: int) -> dict:
    """Under the interpreter: a tile of up to 2^18 elements covering as much of (M, C) as it can."""
    bc = interp_block(C, hi=2048)
    return dict(BLOCK_M=interp_block(M, hi=max(16, (1 << 18) // bc)), BLOCK_C=bc)


def _check_affine(name: str, t, C: int, device) -> None:
    if t is None:
        return
    check_tensor(name, t, device=device, dtypes=None, dim=1)
    if t.numel() != C:
        raise ValueError(f"{BACKEND}: {name} has {t.numel()} entries, expected {C} channels")


def bn_apply(x1, s1: NormStats, w1, b1, x2=None, s2: NormStats | None = None, w2=None, b2=None, res=None,
             relu: bool = False) -> torch.Tensor:
    """``relu?(bn1(x1) [+ bn2(x2)] [+ res])`` in one pass, in x1's dtype."""
    check_tensor("x", x1, dim=2)
    M, C = x1.shape
    for name, t in (("x2", x2), ("residual", res)):
        if t is not None:
            check_tensor(name, t, device=x1.device, dim=2)
            if t.shape != x1.shape:
                raise ValueError(f"{BACKEND}: {name} has shape {tuple(t.shape)}, expected {tuple(x1.shape)}")
    _check_affine("weight", w1, C, x1.device)
    _check_affine("bias", b1, C, x1.device)
    _check_affine("weight2", w2, C, x1.device)
    _check_affine("bias2", b2, C, x1.device)
    y = torch.empty_like(x1)
    if M == 0:
        return y
    dummy = s1.mean
    has2 = x2 is not None
    _APPLY.launch(_rowwise_grid(M, C, _APPLY), x1, s1.mean, s1.invstd, w1 if w1 is not None else dummy,
                  b1 if b1 is not None else dummy,
                  x2 if has2 else x1, s2.mean if has2 else dummy, s2.invstd if has2 else dummy,
                  w2 if w2 is not None else dummy, b2 if b2 is not None else dummy,
                  res if res is not None else x1, y, M, C,
                  HAS_W1=w1 is not None, HAS_B1=b1 is not None, HAS_BN2=has2, HAS_W2=w2 is not None,
                  HAS_B2=b2 is not None, HAS_RES=res is not None, RELU=relu, interp=_interp_tile(M, C))
    return y


def bn_backward(dy, y, x1, s1: NormStats, w1, x2=None, s2: NormStats | None = None, w2=None, relu: bool = False,
                need=(True, True, True, True, True, True, True)):
    """Gradients of ``bn_apply``: (dx1, dw1, db1, dx2, dw2, db2, dres), None where not needed.

    ``need`` flags the same seven outputs. The sums over the rows go through the batch
    statistics' ``reduce_grad_sums`` (one all-reduce when synchronized, also by a rank
    without rows; a fused pair shares one process group); weight and bias gradients stay local.
    """
    M, C = x1.shape
    has2 = x2 is not None
    out = [None] * 7
    dy = dy.contiguous()
    check_tensor("grad_output", dy, device=x1.device, dim=2)
    local = _backward_sums(dy, y, x1, s1, x2, s2, relu) if M else x1.new_zeros(3, C, dtype=torch.float32)
    batch = [s for s in (s1, s2) if s is not None and s.batch]
    sums, n = (batch[0] if batch else s1).reduce_grad_sums(local)  # [sum dz, sum dz*xhat1, sum dz*xhat2]
    need_dx1, need_dx2, need_dres = need[0], need[3] and has2, need[6]
    dx1 = torch.empty_like(x1) if need_dx1 else None
    dx2 = torch.empty_like(x1) if need_dx2 else None
    dres = torch.empty_like(dy) if need_dres else None
    if M and (need_dx1 or need_dx2 or need_dres):
        inv_n = 1.0 / n if n > 0 else 0.0  # (the rows of a fused pair are the same rows: one count)
        _launch_dx(dy, y, relu, x1, s1, w1, x2, s2, w2, sums.contiguous(), dx1, dx2, dres, M, C, inv_n, inv_n)
    out[0], out[3], out[6] = dx1, dx2, dres
    if need[1]:
        out[1] = local[1]
    if need[2]:
        out[2] = local[0]
    if has2 and need[4]:
        out[4] = local[2]
    if has2 and need[5]:
        out[5] = local[0]
    return tuple(out)


def _backward_sums(dy, y, x1, s1: NormStats, x2, s2: NormStats | None, relu: bool) -> torch.Tensor:
    """fp32 ``(3, C)``: [sum dz, sum dz*xhat1, sum dz*xhat2] over the rows, in a fixed order."""
    M, C = x1.shape
    has2 = x2 is not None
    dummy = s1.mean
    tile = _interp_tile(M, C)
    meta = _BWD_REDUCE.meta(tile)
    # enough programs to fill the GPU, each summing a run of rows (one program per channel block on CPU)
    c_blocks = triton.cdiv(C, meta["BLOCK_C"])
    target = 1 if INTERPRET else triton.cdiv(4 * num_sms(x1.device), c_blocks)
    programs = max(1, min(triton.cdiv(M, meta["BLOCK_M"]), target))
    rows = triton.cdiv(triton.cdiv(M, programs), meta["BLOCK_M"]) * meta["BLOCK_M"]
    blocks = triton.cdiv(M, rows)
    part = torch.empty(blocks, 3, C, device=x1.device, dtype=torch.float32)
    _BWD_REDUCE.launch(lambda meta: (blocks, c_blocks), dy, y if relu else dy, x1,
                       s1.mean, s1.invstd, x2 if has2 else x1, s2.mean if has2 else dummy,
                       s2.invstd if has2 else dummy, part, M, C, rows, RELU=relu, HAS_BN2=has2, interp=tile)
    return part[0] if blocks == 1 else sum_leading(part.view(blocks, 3 * C)).view(3, C)


def _launch_dx(dy, y, relu, x1, s1, w1, x2, s2, w2, sums, dx1, dx2, dres, M, C, inv1, inv2):
    dummy = s1.mean
    has2 = x2 is not None
    _BWD_DX.launch(_rowwise_grid(M, C, _BWD_DX), dy, y if relu else dy, x1, s1.mean, s1.invstd,
                   w1 if w1 is not None else dummy, x2 if has2 else x1, s2.mean if has2 else dummy,
                   s2.invstd if has2 else dummy, w2 if w2 is not None else dummy, sums,
                   dx1 if dx1 is not None else dy, dx2 if dx2 is not None else dy, dres if dres is not None else dy,
                   M, C, inv1, inv2, RELU=relu, HAS_W1=w1 is not None, BATCH1=s1.batch, NEED_DX1=dx1 is not None,
                   HAS_BN2=has2, HAS_W2=w2 is not None, BATCH2=has2 and s2.batch, NEED_DX2=dx2 is not None,
                   NEED_DRES=dres is not None, interp=_interp_tile(M, C))


# --- autograd ------------------------------------------------------------------------


class BatchNormActFunction(torch.autograd.Function):
    """``relu?(bn1(x1) [+ bn2(x2)] [+ residual])`` with precomputed statistics and a fused backward.

    The statistics (``NormStats``) are computed before the call, without autograd; the
    backward still differentiates through them when they are batch statistics
    (the usual BatchNorm input gradient), so the result equals BatchNorm followed by
    the add and the ReLU.
    """

    @staticmethod
    def forward(ctx, relu, s1, s2, x1, w1, b1, x2, w2, b2, res):
        y = bn_apply(x1, s1, w1, b1, x2, s2, w2, b2, res, relu)
        ctx.save_for_backward(x1, x2, y if relu else None, w1, w2)
        ctx.relu, ctx.s1, ctx.s2 = relu, s1, s2
        ctx.dtypes = [None if t is None else t.dtype for t in (w1, b1, w2, b2, res)]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x1, x2, y, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad[3:10]
        g = bn_backward(dy.to(x1.dtype), y, x1, ctx.s1, w1, x2, ctx.s2, w2, ctx.relu, need)
        dw1, db1, dw2, db2, dres_t = ctx.dtypes

        def cast(t, dtype):
            return None if t is None or dtype is None else t.to(dtype)

        return (None, None, None, g[0], cast(g[1], dw1), cast(g[2], db1), g[3], cast(g[4], dw2), cast(g[5], db2),
                cast(g[6], dres_t))
