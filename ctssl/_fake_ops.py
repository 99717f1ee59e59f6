"""Fake (meta) implementations of the ``torch.ops.ctssl`` operators.

FakeTensor, meta-device tracing and ``torch.compile`` run an operator without data, so each
one needs a function that says what it would return. Each function below allocates exactly
what its ``*_entry`` in csrc/ returns: shape, dtype, device and strides (densify's output is
channels-last, the BatchNorm statistics are in the accumulation dtype, the pool's argmax is
int8). Outputs the real kernel leaves undefined (gradients masked off by ``output_mask`` /
``need_grad_z``) are None here too: that is how an undefined ``Tensor`` reaches Python, and
the fake path accepts it as ATen's own ``convolution_backward`` does. Checks that need data
(slot ranges, the visible count) stay in the real kernels, which still run at execution time.
``ctssl._ext.load()`` calls ``register`` once the compiled operators are verified.
"""
from __future__ import annotations

import torch

from .sparse.precision import accumulation_dtype


def _known_zero(n) -> bool:
    """``n == 0`` without failing on a data-dependent count (then: assume patches exist, the usual case)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # older torch: guards as before (fails only on unbacked counts)
        return n == 0
    return guard_or_false(n == 0)


def patch_tables(active, num_patches):
    slot = active.new_empty(active.shape, dtype=torch.int32)
    patch_ids = active.new_empty((num_patches,), dtype=torch.int64)
    neighbours = active.new_empty((num_patches, 3, 3), dtype=torch.int32)
    return slot, patch_ids, neighbours


def pack_patches(images, patch_ids, grid_h, grid_w):
    p = images.shape[2] // grid_h
    return images.new_empty((patch_ids.shape[0] * p * p, images.shape[1]))  # contiguous for any input strides


def densify(rows, slot, patch_side, token):
    B, h, w = slot.shape
    return torch.empty((B, rows.shape[1], h * patch_side, w * patch_side), dtype=rows.dtype, device=rows.device,
                       memory_format=torch.channels_last)


def halo_gather(rows, neighbours, patch_side, halo):
    P = patch_side + 2 * halo
    return rows.new_empty((neighbours.shape[0], P, P, rows.shape[1]))


def halo_scatter(grad_halo, neighbours, patch_side, halo):
    return grad_halo.new_empty((neighbours.shape[0] * patch_side * patch_side, grad_halo.shape[3]))


def masked_conv2d(rows, neighbours, weight, bias, patch_side, stride, padding, dilation, groups):
    q = patch_side // stride
    return rows.new_empty((neighbours.shape[0] * q * q, weight.shape[0]))


def masked_conv2d_backward(grad_out, rows, neighbours, weight, patch_side, stride, padding, dilation, groups,
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


def bn_stats(rows):
    acc = accumulation_dtype(rows.dtype)
    return rows.new_empty((rows.shape[1],), dtype=acc), rows.new_empty((rows.shape[1],), dtype=acc)


def bn_apply(rows, mean, invstd, weight, bias, residual, activation):
    return torch.empty_like(rows)


def bn_backward_reduce(grad_y, y, rows, mean, invstd, activation):
    return bn_stats(rows)


def bn_backward_apply(grad_y, y, rows, mean, invstd, weight, sum_dz, sum_dz_xhat, count, batch_stats, activation,
                      need_grad_z):
    return torch.empty_like(rows), (torch.empty_like(rows) if need_grad_z else None)


def max_pool2d(rows, neighbours, patch_side, kernel_size, stride, padding):
    q = patch_side // stride
    shape = (neighbours.shape[0] * q * q, rows.shape[1])
    return rows.new_empty(shape), rows.new_empty(shape, dtype=torch.int8)


def max_pool2d_backward(grad_out, argmax, neighbours, patch_side, kernel_size, stride, padding):
    return grad_out.new_empty((neighbours.shape[0] * patch_side * patch_side, grad_out.shape[1]))


FAKES = {f.__name__: f for f in (
    patch_tables, pack_patches, densify, halo_gather, halo_scatter, masked_conv2d, masked_conv2d_backward,
    bn_stats, bn_apply, bn_backward_reduce, bn_backward_apply, max_pool2d, max_pool2d_backward)}

_registered: list[str] = []


def register() -> bool:
    """Register every fake impl (once); False on torch < 2.4, which has no ``register_fake``.

    Raises if torch refuses one: the caller (``_ext.load``) reports it without failing."""
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is None:
        return False
    for name, impl in FAKES.items():
        if name not in _registered:
            register_fake(f"ctssl::{name}", impl)
            _registered.append(name)
    return True


__all__ = ["FAKES", "register"]
