"""Masked conv on rows: ``ctssl.masked_conv2d`` and its backward (csrc/halo.cpp, halo_cuda.cu).

A k x k conv gathers each visible patch with its halo (``ctssl.halo_gather``, from the neighbour table of
radius ``ceil(padding / patch_side)``: ConvNeXt's depthwise 7x7 reads up to 3 patches away) and runs cuDNN on it
(groups = channels: cuDNN's grouped conv);
a 1x1 conv is a GEMM on the rows. The backward recomputes the halo and folds its gradient back with
a deterministic gather (``ctssl.halo_scatter``).
"""
from __future__ import annotations

import torch

from .runtime import fake, ops


class MaskedConv2d(torch.autograd.Function):
    """Masked conv on rows: halo gather + framework conv, or a GEMM for 1x1."""

    @staticmethod
    def forward(ctx, rows, weight, bias, neighbours, patch_side, stride, padding, dilation, groups):
        ctx.save_for_backward(rows, weight, neighbours)
        ctx.geometry = (patch_side, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return ops().masked_conv2d(rows, neighbours, weight, bias, patch_side, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, neighbours = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
        if not any(mask):
            return (None,) * 9
        grad_rows, grad_weight, grad_bias = ops().masked_conv2d_backward(
            grad.contiguous(), rows, neighbours, weight, *ctx.geometry, mask)
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None, None


def _known_zero(n) -> bool:
    """``n == 0`` without failing on a data-dependent count (then: assume patches exist, the usual case)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # older torch: guards as before (fails only on unbacked counts)
        return n == 0
    return guard_or_false(n == 0)


@fake("halo_gather")
def _halo_gather_fake(rows, neighbours, patch_side, halo):
    P = patch_side + 2 * halo
    return rows.new_empty((neighbours.shape[0], P, P, rows.shape[1]))


@fake("halo_scatter")
def _halo_scatter_fake(grad_halo, neighbours, patch_side, halo):
    return grad_halo.new_empty((neighbours.shape[0] * patch_side * patch_side, grad_halo.shape[3]))


@fake("masked_conv2d")
def _masked_conv2d_fake(rows, neighbours, weight, bias, patch_side, stride, padding, dilation, groups):
    q = patch_side // stride
    return rows.new_empty((neighbours.shape[0] * q * q, weight.shape[0]))


@fake("masked_conv2d_backward")
def _masked_conv2d_backward_fake(grad_out, rows, neighbours, weight, patch_side, stride, padding, dilation, groups,
                                 output_mask):
    """Mirrors the entry's three paths; the conv path asks ATen's own convolution_backward for
    grad_weight, whose memory format (channels-last here) depends on the conv backend."""
    N, C, Cout = neighbours.shape[0], rows.shape[1], weight.shape[0]
    grad_rows = rows.new_empty(rows.shape) if output_mask[0] else None  # rows are contiguous (checked)
    grad_bias = rows.new_empty((Cout,)) if output_mask[2] else None
    grad_weight = None
    if _known_zero(N):
        grad_weight = torch.empty_like(weight) if output_mask[1] else None  # zeros_like keeps weight's strides
    elif weight.shape[2] == 1 and padding == 0 and groups == 1:
        grad_weight = weight.new_empty(weight.shape) if output_mask[1] else None  # mm result, reshaped
    elif output_mask[1] or output_mask[2]:
        P, q = patch_side + 2 * padding, patch_side // stride
        x = rows.new_empty((N, P, P, C)).permute(0, 3, 1, 2)  # the channels-last halo buffer
        go = grad_out.new_empty((N, q, q, Cout)).permute(0, 3, 1, 2)
        _, grad_weight, bias_grad = torch.ops.aten.convolution_backward(
            go, x, weight, [Cout] if output_mask[2] else None, [stride, stride], [0, 0], [dilation, dilation], False,
            [0, 0], groups, [False, output_mask[1], output_mask[2]])
        grad_bias = bias_grad if output_mask[2] else None
    return grad_rows, grad_weight, grad_bias


__all__ = ["MaskedConv2d"]
