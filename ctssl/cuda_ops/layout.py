"""Dense images <-> packed rows: ``ctssl.pack_patches`` and ``ctssl.densify`` (csrc/layout.cpp, layout_cuda.cu),
gather kernels that are each other's adjoint."""
from __future__ import annotations

import torch

from ..sparse.precision import accumulation_dtype
from .runtime import fake, ops


class PackPatches(torch.autograd.Function):
    """Images (B, C, H, W) -> visible rows (N * p * p, C); backward writes rows back densely."""

    @staticmethod
    def forward(ctx, images, patch_ids, slot, grid_h, grid_w):
        ctx.save_for_backward(slot)
        ctx.p = images.shape[-2] // grid_h
        return ops().pack_patches(images, patch_ids, grid_h, grid_w)

    @staticmethod
    def backward(ctx, grad_rows):
        (slot,) = ctx.saved_tensors
        grad = ops().densify(grad_rows.contiguous(), slot, ctx.p, None) if ctx.needs_input_grad[0] else None
        return grad, None, None, None, None


class Densify(torch.autograd.Function):
    """Rows -> dense (B, C, H, W) (channels-last memory), masked positions 0 or ``token``."""

    @staticmethod
    def forward(ctx, rows, token, slot, patch_ids, patch_side, mask):
        ctx.save_for_backward(patch_ids, mask)
        ctx.grid = (slot.shape[1], slot.shape[2])
        ctx.has_token = token is not None
        return ops().densify(rows, slot, patch_side, token)

    @staticmethod
    def backward(ctx, grad):
        patch_ids, mask = ctx.saved_tensors
        grad_rows = grad_token = None
        if ctx.needs_input_grad[0]:
            grad_rows = ops().pack_patches(grad, patch_ids, *ctx.grid)
        if ctx.has_token and ctx.needs_input_grad[1]:
            acc = accumulation_dtype(grad.dtype)
            grad_token = grad.masked_fill(mask, 0).sum(dim=(0, 2, 3), dtype=acc).to(grad.dtype)
        return grad_rows, grad_token, None, None, None, None


@fake("pack_patches")
def _pack_patches_fake(images, patch_ids, grid_h, grid_w):
    p = images.shape[2] // grid_h
    return images.new_empty((patch_ids.shape[0] * p * p, images.shape[1]))  # contiguous for any input strides


@fake("densify")
def _densify_fake(rows, slot, patch_side, token):
    B, h, w = slot.shape
    return torch.empty((B, rows.shape[1], h * patch_side, w * patch_side), dtype=rows.dtype, device=rows.device,
                       memory_format=torch.channels_last)


__all__ = ["Densify", "PackPatches"]
