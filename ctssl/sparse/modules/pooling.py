"""Max and average pooling that also take sparse maps (masked pixels read 0, outside reads padding)."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``; on a sparse map ``pool(x) * active_at(y)`` with -inf padding."""

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.ceil_mode or self.return_indices or self.dilation not in (1, (1, 1)):
            raise ValueError("sparse max pool supports ceil_mode=False, return_indices=False, dilation=1 only")
        return x.backend.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d``; on a sparse map ``pool(x) * active_at(y)`` (masked pixels count as 0)."""

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.ceil_mode or self.divisor_override is not None:
            raise ValueError("sparse avg pool supports ceil_mode=False and no divisor_override only")
        return x.backend.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)
