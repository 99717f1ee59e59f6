"""Conv2d that also takes sparse maps: same parameters and state_dict as ``nn.Conv2d``."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` on dense tensors; SparK's masked conv on a ``SparseTensor``.

    On a sparse map the output is ``conv(x) * active_at(y)``, computed by the map's backend.
    """

    def forward(self, x):
        if not isinstance(x, SparseTensor):
            return super().forward(x)
        if self.padding_mode != "zeros":
            raise ValueError(f"sparse conv supports padding_mode='zeros' only, got {self.padding_mode!r}")
        if isinstance(self.padding, str):
            raise ValueError(f"sparse conv needs numeric padding, got {self.padding!r}")
        return x.backend.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
