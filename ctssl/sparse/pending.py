"""Op results computed on first use, so a backend can fuse them with the op that reads them.

``PendingPacked`` is a packed tensor whose ``values`` are computed when first read (then
cached); a backend op that knows the pending kind folds it into its own kernel instead.

Backends with a fused "BatchNorm apply + residual + activation" pass (``triton``,
``cuda``) return a ``PendingBatchNorm`` from ``batch_norm``: the statistics are final
(running statistics already updated), only the apply pass waits. The backend's
``relu``/``relu6``/``add`` look at ``pending`` and fold themselves into that pass; any
other reader of ``values`` gets the BatchNorm applied alone (then cached).

The backend provides ``_apply(pending, activation)`` (activation None, "relu" or
"relu6"); ``pending`` exposes ``x1``, the rows being normalised, and ``plus(other)``, the
pending op with ``other`` added, or None where it cannot be fused. ``fuse_activation`` and
``fuse_add`` are the backends' shared fusion rules.
"""
from __future__ import annotations

import torch

from .tensor import PackedTensor


class PendingPacked(PackedTensor):
    """Packed rows computed by ``_compute()`` when ``values`` is first read (then cached)."""

    __slots__ = ("_applied",)

    def __init__(self, index, stride, backend):
        self._applied = None
        super().__init__(None, index, stride, backend)

    def _compute(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def values(self):
        if self._applied is None:
            self._applied = self._compute()
        return self._applied

    @values.setter
    def values(self, v):
        if v is not None:
            self._applied = v

    @property
    def unapplied(self) -> bool:
        return self._applied is None

    def with_values(self, values, stride=None):
        return PackedTensor(values, self.index, self.stride if stride is None else stride, self.backend)


class PendingBatchNorm(PendingPacked):
    """``bn(x) [+ residual]`` with known statistics, applied when ``values`` is first read."""

    __slots__ = ("pending",)

    def __init__(self, pending, index, stride, backend):
        self.pending = pending
        super().__init__(index, stride, backend)

    def _compute(self) -> torch.Tensor:
        return self.backend._apply(self.pending, None)

    @property
    def channels(self) -> int:
        return self.pending.x1.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.pending.x1.dtype

    @property
    def device(self) -> torch.device:
        return self.pending.x1.device


def fuse_activation(x, activation: str, backend) -> PackedTensor | None:
    """``activation(x)`` as the pending BatchNorm's own apply pass, or None when ``x`` is not one."""
    if isinstance(x, PendingBatchNorm) and x.unapplied:
        return PackedTensor(backend._apply(x.pending, activation), x.index, x.stride, backend)
    return None


def fuse_add(a, b, backend) -> PendingBatchNorm | None:
    """``a + b`` kept pending when either operand is an unapplied BatchNorm whose ``plus`` takes the
    other (either order), or None. The caller has checked that index and stride agree."""
    for first, second in ((a, b), (b, a)):
        if isinstance(first, PendingBatchNorm) and first.unapplied:
            merged = first.pending.plus(second)
            if merged is not None:
                return PendingBatchNorm(merged, a.index, a.stride, backend)
    return None


__all__ = ["PendingPacked", "PendingBatchNorm", "fuse_activation", "fuse_add"]
