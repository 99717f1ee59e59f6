"""Max pool on rows: ``ctssl.max_pool2d`` and its backward (csrc/maxpool.cpp, maxpool_cuda.cu).

Masked taps read 0, taps beyond the image are skipped (torch's -inf padding); the winning tap per
element is kept as int8 and the backward gathers each input pixel's gradient (no atomics).
"""
from __future__ import annotations

import torch

from .runtime import fake, ops


class MaskedMaxPool2d(torch.autograd.Function):
    """Max pool on rows; the winning tap per element (int8) is kept for the backward."""

    @staticmethod
    def forward(ctx, rows, neighbours, patch_side, kernel_size, stride, padding):
        out, argmax = ops().max_pool2d(rows, neighbours, patch_side, kernel_size, stride, padding)
        ctx.save_for_backward(argmax, neighbours)
        ctx.geometry = (patch_side, kernel_size, stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        argmax, neighbours = ctx.saved_tensors
        grad_rows = ops().max_pool2d_backward(grad.contiguous(), argmax, neighbours, *ctx.geometry)
        return grad_rows, None, None, None, None, None


@fake("max_pool2d")
def _max_pool2d_fake(rows, neighbours, patch_side, kernel_size, stride, padding):
    q = patch_side // stride
    shape = (neighbours.shape[0] * q * q, rows.shape[1])
    return rows.new_empty(shape), rows.new_empty(shape, dtype=torch.int8)


@fake("max_pool2d_backward")
def _max_pool2d_backward_fake(grad_out, argmax, neighbours, patch_side, kernel_size, stride, padding):
    return grad_out.new_empty((neighbours.shape[0] * patch_side * patch_side, grad_out.shape[1]))


__all__ = ["MaskedMaxPool2d"]
