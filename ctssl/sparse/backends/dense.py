"""The ``dense`` backend: SparK's emulation, and the reference every backend meets.

Every op runs densely on the full map and is then multiplied by the patch mask at
its output resolution; BatchNorm gathers the visible pixels with a boolean index,
normalises them and scatters them back into zeros, exactly as SparK's code does
(InstanceNorm likewise, with statistics per sample; LayerNorm over each position's
channels too). A Linear over channels is masked like a conv (its bias would otherwise
fill masked positions). Images and volumes alike: the ops are torch's 2-D or 3-D ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batchnorm_rows import batch_norm_rows
from ..index import PatchIndex
from ..instance_norm_rows import instance_norm_rows
from ..tensor import MaskedDenseTensor, SparseTensor
from .base import ALL_OPS, Backend, check_aligned

_CONV = {2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def channels_last(values: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, *spatial, C)`` (a view)."""
    return values.movedim(1, -1)


class DenseBackend(Backend):
    name = "dense"
    needs = "nothing (always available)"
    spatial_dims = (2, 3)
    supported_ops = ALL_OPS

    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        mask = index.dense_mask(1, images.dtype)
        return MaskedDenseTensor(images * mask, index, 1, self)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        return x.values

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        mask = x.index.dense_mask(x.stride)
        return torch.where(mask, x.values, self._per_channel(x, token))

    def _masked(self, x: SparseTensor, y: torch.Tensor, stride: int) -> SparseTensor:
        return MaskedDenseTensor(y * x.index.dense_mask(stride, y.dtype), x.index, stride, self)

    def _conv(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned(f"conv{x.ndim}d", x, weight.shape[2:], stride, padding, dilation)
        y = _CONV[x.ndim](x.values, weight, bias, stride, padding, dilation, groups)
        return self._masked(x, y, out_stride)

    def _max_pool(self, x, kernel_size, stride, padding):
        out_stride = check_aligned(f"max_pool{x.ndim}d", x, kernel_size, stride, padding)
        return self._masked(x, _MAX_POOL[x.ndim](x.values, kernel_size, stride, padding), out_stride)

    def _avg_pool(self, x, kernel_size, stride, padding, count_include_pad=True):
        out_stride = check_aligned(f"avg_pool{x.ndim}d", x, kernel_size, stride, padding)
        y = _AVG_POOL[x.ndim](x.values, kernel_size, stride, padding, count_include_pad=count_include_pad)
        return self._masked(x, y, out_stride)

    conv2d = conv3d = _conv
    max_pool2d = max_pool3d = _max_pool
    avg_pool2d = avg_pool3d = _avg_pool

    def _on_visible_rows(self, x, fn) -> SparseTensor:
        """``fn(rows, samples)`` on the visible positions gathered as rows (``samples``: each row's sample),
        scattered back into zeros: SparK's gather-normalise-scatter."""
        mask = x.index.dense_mask(x.stride).squeeze(1)  # (B, *spatial)
        values = channels_last(x.values)
        samples = torch.arange(mask.shape[0], device=mask.device).view(-1, *([1] * x.ndim)).expand_as(mask)
        rows = fn(values[mask], samples[mask])
        out = torch.zeros(values.shape, dtype=rows.dtype, device=rows.device)
        out[mask] = rows
        return MaskedDenseTensor(out.movedim(-1, 1), x.index, x.stride, self)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        return self._on_visible_rows(x, lambda rows, _: batch_norm_rows(
            rows, weight, bias, running_mean, running_var, training, momentum, eps, process_group))

    def instance_norm(self, x, weight, bias, eps):
        return self._on_visible_rows(x, lambda rows, samples: instance_norm_rows(
            rows, weight, bias, samples, x.index.batch_size, eps))

    def layer_norm(self, x, weight, bias, eps):
        return self._on_visible_rows(x, lambda rows, _: F.layer_norm(rows, rows.shape[1:], weight, bias, eps))

    def linear(self, x, weight, bias):
        y = F.linear(channels_last(x.values), weight, bias).movedim(-1, 1)
        return self._masked(x, y, x.stride)

    def _per_channel(self, x, v: torch.Tensor) -> torch.Tensor:
        return v.to(x.values.dtype).view(1, -1, *([1] * x.ndim))

    def scale_channels(self, x, scale):
        return x.with_values(x.values * self._per_channel(x, scale))

    def scale_samples(self, x, scale):
        return x.with_values(x.values * scale.to(x.values.dtype).view(-1, *([1] * (x.ndim + 1))))
