"""The ``dense`` backend: SparK's emulation, and the reference every backend meets.

Every op runs densely on the full map and is then multiplied by the patch mask at
its output resolution; BatchNorm gathers the visible pixels with a boolean index,
normalises them and scatters them back into zeros, exactly as SparK's code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batchnorm_rows import batch_norm_rows
from ..index import PatchIndex
from ..tensor import MaskedDenseTensor, SparseTensor
from .base import Backend, check_aligned


class DenseBackend(Backend):
    name = "dense"
    needs = "nothing (always available)"

    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        mask = index.dense_mask(1, images.dtype)
        return MaskedDenseTensor(images * mask, index, 1, self)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        return x.values

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        mask = x.index.dense_mask(x.stride)
        return torch.where(mask, x.values, token.to(x.values.dtype).view(1, -1, 1, 1))

    def _masked(self, x: SparseTensor, y: torch.Tensor, stride: int) -> SparseTensor:
        return MaskedDenseTensor(y * x.index.dense_mask(stride, y.dtype), x.index, stride, self)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        y = F.conv2d(x.values, weight, bias, stride, padding, dilation, groups)
        return self._masked(x, y, out_stride)

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        return self._masked(x, F.max_pool2d(x.values, kernel_size, stride, padding), out_stride)

    def avg_pool2d(self, x, kernel_size, stride, padding, count_include_pad=True):
        out_stride = check_aligned("avg_pool2d", x, kernel_size, stride, padding)
        y = F.avg_pool2d(x.values, kernel_size, stride, padding, count_include_pad=count_include_pad)
        return self._masked(x, y, out_stride)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        mask = x.index.dense_mask(x.stride).squeeze(1)  # (B, H, W)
        bhwc = x.values.permute(0, 2, 3, 1)
        rows = batch_norm_rows(bhwc[mask], weight, bias, running_mean, running_var, training, momentum,
                               eps, process_group)
        out = torch.zeros(bhwc.shape, dtype=rows.dtype, device=rows.device)
        out[mask] = rows
        return MaskedDenseTensor(out.permute(0, 3, 1, 2), x.index, x.stride, self)

    def scale_samples(self, x, scale):
        return x.with_values(x.values * scale.to(x.values.dtype).view(-1, 1, 1, 1))
