"""Deterministic column reductions: partial sums per block of rows, then a fixed-order sum.

No atomics: the same inputs give the same bits on every run, in either mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import TunedKernel, check_tensor, config


@triton.jit
def _column_partial_kernel(x_ptr, out_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[block, c] = sum of x[rows of block, c] in fp32."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rm < M)[:, None] & (rc < C)[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_m * C + rc, tl.sum(x, axis=0), mask=rc < C)


@triton.jit
def _sum_leading_kernel(x_ptr, out_ptr, S, L, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[l] = sum over s of x[s, l], in the order s = 0, 1, ... (chunks of BLOCK_S)."""
    pid = tl.program_id(0)
    rl = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = rl < L
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        mask = (rs < S)[:, None] & l_ok[None, :]
        x = tl.load(x_ptr + rs.to(tl.int64)[:, None] * L + rl[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    tl.store(out_ptr + rl, acc, mask=l_ok)


_COLUMN_PARTIAL = TunedKernel(_column_partial_kernel, [], key=[], fixed=config(4, 2, BLOCK_M=128, BLOCK_C=64),
                              interp=config(BLOCK_M=256, BLOCK_C=128))
_SUM_LEADING = TunedKernel(_sum_leading_kernel, [], key=[], fixed=config(4, 2, BLOCK_S=8, BLOCK_L=256),
                           interp=config(BLOCK_S=64, BLOCK_L=1024))


def sum_leading(x: torch.Tensor) -> torch.Tensor:
    """Sum a ``(S, L)`` tensor over its first axis, as fp32 ``(L,)``, in a fixed order."""
    check_tensor("x", x, dtypes=None, dim=2)
    S, L = x.shape
    out = torch.empty(L, device=x.device, dtype=torch.float32)
    if L == 0:
        return out
    if S == 0:
        return out.zero_()
    _SUM_LEADING.launch(lambda meta: (triton.cdiv(L, meta["BLOCK_L"]),), x, out, S, L)
    return out


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a ``(M, C)`` tensor over its rows, as fp32 ``(C,)``: block partials, then a fixed-order sum."""
    check_tensor("x", x, dtypes=None, dim=2)
    M, C = x.shape
    if M == 0 or C == 0:
        return torch.zeros(C, device=x.device, dtype=torch.float32)
    bm = _COLUMN_PARTIAL.meta()["BLOCK_M"]
    blocks = triton.cdiv(M, bm)
    part = torch.empty(blocks, C, device=x.device, dtype=torch.float32)
    _COLUMN_PARTIAL.launch(lambda meta: (blocks, triton.cdiv(C, meta["BLOCK_C"])), x, part, M, C)
    return part[0] if blocks == 1 else sum_leading(part)
