"""Op results computed on first use, so a backend can fuse them with the op that reads them.

``PendingPacked`` is a packed tensor whose ``values`` are computed when first read (then cached);
a backend op that knows the pending kind folds it into its own kernel instead (the triton
backend's depthwise conv, read by a LayerNorm). A BatchNorm result is the main kind:

The protocol (part of ``Backend``, see ``ctssl.sparse.backends.base``): a backend with a fused
"BatchNorm apply [+ second BatchNorm | + residual] [+ activation]" pass (``triton``, ``cuda``)
returns a ``PendingBatchNorm`` from ``batch_norm``. Its statistics are final (running statistics
already updated); only the apply pass waits, described by a ``PendingBN``. Then:

- ``relu``/``relu6`` of an unapplied pending tensor run as its apply pass when the activation is
  in ``backend.pending_activations`` (``fuse_activation``);
- ``a + b`` with an unapplied single pending BatchNorm on either side stays pending with the other
  operand as its residual, or, where ``backend.pending_pairs``, as a second BatchNorm of the same
  process group (``fuse_add``, ``PendingBN.plus``): a ResNet block's ``relu(bn(x) + identity)`` and
  a bottleneck's ``relu(bn3(y) + bn_ds(z))`` are one pass, forward and backward;
- any other reader of ``values`` gets the BatchNorm applied alone (then cached).

The backend applies a ``PendingBN`` in ``apply_pending(pending, activation)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .norm_stats import NormStats
from .tensor import PackedTensor


@dataclass(frozen=True, eq=False)
class PendingBN:
    """``bn1(x1) [+ bn2(x2)] [+ res]`` with final statistics, not yet applied.

    ``x1`` (and ``x2``, ``res``) are rows of one shape; ``stats1``/``stats2`` the statistics each
    BatchNorm normalises with; ``weight``/``bias`` their affine parameters (or None).
    """

    x1: torch.Tensor
    stats1: NormStats
    weight1: torch.Tensor | None
    bias1: torch.Tensor | None
    x2: torch.Tensor | None = None
    stats2: NormStats | None = None
    weight2: torch.Tensor | None = None
    bias2: torch.Tensor | None = None
    res: torch.Tensor | None = None

    @property
    def single(self) -> bool:
        """One BatchNorm, nothing added yet."""
        return self.x2 is None and self.res is None

    def plus(self, other, pairs: bool) -> PendingBN | None:
        """This single BatchNorm plus ``other`` as one pending op, or None when they cannot be fused.

        With ``pairs``, an unapplied single pending ``other`` of the same dtype and process group
        becomes the second BatchNorm; otherwise ``other`` is read (a pending one applied alone) and
        becomes the residual when it has the rows' dtype and shape.
        """
        if not self.single:
            return None
        if pairs and isinstance(other, PendingBatchNorm) and other.unapplied and other.pending.single:
            o = other.pending
            if o.x1.dtype == self.x1.dtype and o.stats1.group is self.stats1.group:
                return replace(self, x2=o.x1, stats2=o.stats1, weight2=o.weight1, bias2=o.bias1)
        r = other.values
        if r.dtype == self.x1.dtype and r.shape == self.x1.shape:
            return replace(self, res=r.contiguous())
        return None


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
    """``bn(x) [+ ...]`` with known statistics, applied by its backend when ``values`` is first read."""

    __slots__ = ("pending",)

    def __init__(self, pending: PendingBN, index, stride, backend):
        self.pending = pending
        super().__init__(index, stride, backend)

    def _compute(self) -> torch.Tensor:
        return self.backend.apply_pending(self.pending, None)

    @property
    def channels(self) -> int:
        return self.pending.x1.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.pending.x1.dtype

    @property
    def device(self) -> torch.device:
        return self.pending.x1.device


def fuse_activation(x, activation: str) -> PackedTensor | None:
    """``activation(x)`` as the pending BatchNorm's own apply pass, or None when ``x`` is not an unapplied
    pending tensor or its backend does not fold ``activation`` in."""
    if isinstance(x, PendingBatchNorm) and x.unapplied and activation in x.backend.pending_activations:
        return PackedTensor(x.backend.apply_pending(x.pending, activation), x.index, x.stride, x.backend)
    return None


def fuse_add(a, b) -> PendingBatchNorm | None:
    """``a + b`` kept pending when either operand is an unapplied BatchNorm whose ``plus`` takes the
    other (either order), or None. The caller has checked that index and stride agree."""
    for first, second in ((a, b), (b, a)):
        if isinstance(first, PendingBatchNorm) and first.unapplied:
            merged = first.pending.plus(second, first.backend.pending_pairs)
            if merged is not None:
                return PendingBatchNorm(merged, a.index, a.stride, first.backend)
    return None


__all__ = ["PendingBN", "PendingPacked", "PendingBatchNorm", "fuse_activation", "fuse_add"]
