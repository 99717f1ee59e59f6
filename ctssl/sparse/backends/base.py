"""The backend interface: the few operations a masked ResNet or ConvNeXt needs.

Every backend implements the semantics of design.md section 2 (the ``dense``
backend *is* that definition). Elementwise operations are shared here because
they map 0 to 0 in any layout; so is the pending-BatchNorm protocol
(``ctssl.sparse.pending``), through which a backend fuses BatchNorm with the
activation and residual add that follow it.

A model states the ops it needs (an encoder's ``sparse_ops``, names from ``OPS``) and a
backend the ops it has (``supported_ops``); ``check_ops`` refuses a model a backend cannot
run, with the reason, when its input is built (``ctssl.sparse.sparse_input(..., ops=)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..index import PatchIndex
from ..pending import PendingBN, fuse_activation, fuse_add
from ..tensor import SparseTensor

OPS: dict[str, str] = {
    "conv": "convolution with groups=1 (conv2d / conv3d), any aligned kernel, stride, padding, dilation",
    "depthwise_conv": "depthwise k x k convolution (conv2d / conv3d with groups = channels), stride 1",
    "batch_norm": "BatchNorm over visible positions",
    "layer_norm": "LayerNorm over the channels of each visible position",
    "linear": "a Linear over the channels of each visible position",
    "max_pool": "max pooling",
    "avg_pool": "average pooling",
    "instance_norm": "InstanceNorm over each sample's visible positions",
    "relu": "ReLU / ReLU6",
    "leaky_relu": "LeakyReLU",
    "gelu": "GELU",
    "scale_channels": "per-channel scale (layer scale)",
    "scale_samples": "per-sample scale (stochastic depth)",
    "add": "residual add",
}
"""Names a model may list in its ``sparse_ops`` (what each one means); the same for images and volumes
(``spatial_dims`` says which grids a backend computes on)."""
RESNET_OPS = frozenset({"conv", "batch_norm", "max_pool", "relu", "add", "scale_samples"})
CONVNEXT_OPS = frozenset({"conv", "depthwise_conv", "layer_norm", "linear", "gelu", "scale_channels",
                          "scale_samples", "add"})
ALL_OPS = frozenset(OPS)


def ntuple(v, n: int) -> tuple[int, ...]:
    """An int or an n-sequence as an n-tuple of ints (torch's convention for kernel, stride, ...)."""
    if isinstance(v, (tuple, list)):
        if len(v) != n:
            raise ValueError(f"expected an int or {n} values, got {v}")
        return tuple(int(e) for e in v)
    return (int(v),) * n


def pair(v) -> tuple[int, int]:
    return ntuple(v, 2)


def check_aligned(op: str, x: SparseTensor, kernel, stride, padding, dilation=1) -> int:
    """Check that an op keeps the patch grid aligned and return its output stride.

    SparK's sparse ops require the output map to be exactly the input map divided
    by the stride (so the same patches stay visible); anything else is refused.
    """
    n = x.ndim
    for what, v in (("kernel", kernel), ("stride", stride), ("padding", padding), ("dilation", dilation)):
        if isinstance(v, (tuple, list)) and len(v) != n:
            raise ValueError(f"{op}: {what} {tuple(v)} has {len(v)} axes but the map has {n} spatial axes "
                             f"(dense shape {x.dense_shape})")
    k, s, pad, d = ntuple(kernel, n), ntuple(stride, n), ntuple(padding, n), ntuple(dilation, n)
    p = x.patch_side
    for axis in range(n):
        if p % s[axis]:
            raise ValueError(
                f"{op}: stride {s[axis]} does not divide the patch side {p} at feature stride {x.stride}"
            )
        out = (p + 2 * pad[axis] - d[axis] * (k[axis] - 1) - 1) // s[axis] + 1
        if out * s[axis] != p:
            raise ValueError(
                f"{op}: kernel {k}, stride {s}, padding {pad}, dilation {d} does not map a patch of side "
                f"{p} onto side {p // s[axis]}; sparse ops need output size = input size / stride"
            )
    if len(set(s)) != 1:
        raise ValueError(f"{op}: anisotropic stride {s} is not supported")
    return x.stride * s[0]


class Backend:
    """One implementation of the masked ops, selected by name.

    Op names follow ``torch.nn.functional``: ``conv2d`` / ``conv3d``, ``max_pool2d`` /
    ``max_pool3d``, ... A backend lists the grids it computes on in ``spatial_dims``
    (2: images, 3: volumes); ``sparse_input`` refuses the others with that reason.
    """

    name: str = "?"
    needs: str = ""  # what to install or set for this backend, shown when unavailable
    spatial_dims: tuple[int, ...] = (2,)
    supported_ops: frozenset[str] = RESNET_OPS | {"avg_pool", "leaky_relu"}
    unsupported_ops_reason: str = "not implemented in this backend"
    """Why the ops missing from ``supported_ops`` are missing (shown when a model needs them)."""
    self_check_before_auto: bool = False
    """Custom kernels: ``auto`` selects this backend on a device only after it passed its self-check there
    (``ctssl.sparse.self_check``)."""

    def unavailable_reason(self) -> str | None:
        """None when usable here, else why not and what to install."""
        return None

    def check_device(self, device: torch.device) -> None:
        """Raise a clear error if this backend cannot run on ``device``."""

    def check_spatial_dims(self, ndim: int) -> None:
        """Raise a clear error if this backend has no ops for ``ndim``-D grids (2: images, 3: volumes)."""
        if ndim not in self.spatial_dims:
            what = {2: "2-D images", 3: "3-D volumes"}.get(ndim, f"{ndim}-D grids")
            raise ValueError(f"backend {self.name!r} does not implement sparse ops on {what} "
                             f"(it supports {', '.join(f'{d}-D' for d in self.spatial_dims)}); "
                             f"use backend 'torch' or 'dense'")

    def check_ops(self, ops, model: str = "this model") -> None:
        """Raise a clear error if ``model`` needs ops (names from ``OPS``) this backend does not have."""
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"{model} lists unknown sparse ops {', '.join(unknown)}; known: {', '.join(OPS)}")
        missing = sorted(set(ops) - self.supported_ops)
        if missing:
            raise ValueError(f"backend {self.name!r} cannot run {model}: it has no {', '.join(missing)} op "
                             f"({self.unsupported_ops_reason}); use backend 'torch', 'triton' or 'dense'")
    def training_unsupported_reason(self, device: torch.device) -> str | None:
        """None when this backend can train on ``device`` (run the backward), else why not and what to use."""
        return None

    # --- layout conversion -------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        raise NotImplementedError

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        raise NotImplementedError

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        """Dense ``(B, C, *spatial)`` map with masked positions filled by a per-channel token."""
        raise NotImplementedError

    # --- ops ---------------------------------------------------------------
    def conv2d(self, x, weight, bias, stride, padding, dilation, groups) -> SparseTensor:
        raise NotImplementedError

    def conv3d(self, x, weight, bias, stride, padding, dilation, groups) -> SparseTensor:
        self.check_spatial_dims(3)
        raise NotImplementedError

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None) -> SparseTensor:
        """BatchNorm over the visible positions (design.md section 2). A backend with a fused apply pass
        may return a ``ctssl.sparse.pending.PendingBatchNorm``: statistics final, apply deferred."""
        raise NotImplementedError

    def instance_norm(self, x, weight, bias, eps) -> SparseTensor:
        """InstanceNorm over the visible positions: statistics per (sample, channel) over that sample's visible
        positions, output 0 where masked; no running statistics."""
        raise NotImplementedError(f"backend {self.name!r} has no instance_norm")

    def max_pool2d(self, x, kernel_size, stride, padding) -> SparseTensor:
        raise NotImplementedError

    def max_pool3d(self, x, kernel_size, stride, padding) -> SparseTensor:
        self.check_spatial_dims(3)
        raise NotImplementedError

    def avg_pool2d(self, x, kernel_size, stride, padding, count_include_pad=True) -> SparseTensor:
        raise NotImplementedError

    def avg_pool3d(self, x, kernel_size, stride, padding, count_include_pad=True) -> SparseTensor:
        self.check_spatial_dims(3)
        raise NotImplementedError

    def scale_samples(self, x: SparseTensor, scale: torch.Tensor) -> SparseTensor:
        """Multiply each image's features by ``scale[b]`` (stochastic depth)."""
        raise NotImplementedError

    def scale_channels(self, x: SparseTensor, scale: torch.Tensor) -> SparseTensor:
        """Multiply channel c by ``scale[c]`` (ConvNeXt's layer scale)."""
        raise NotImplementedError

    def layer_norm(self, x: SparseTensor, weight, bias, eps: float) -> SparseTensor:
        """LayerNorm over the channels of every visible position (fp32 statistics); masked positions stay 0."""
        raise NotImplementedError

    def linear(self, x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> SparseTensor:
        """``x @ weight.T + bias`` at every visible position; masked positions stay 0 (no bias there)."""
        raise NotImplementedError
    # --- pending BatchNorm (ctssl.sparse.pending) ---------------------------
    pending_activations: frozenset[str] = frozenset()
    """Activations ``apply_pending`` folds into a pending BatchNorm's apply pass ("relu", "relu6")."""
    pending_pairs: bool = False
    """Whether ``apply_pending`` takes ``bn1(x1) + bn2(x2)`` (else a second BatchNorm is read as a residual)."""

    def apply_pending(self, pending: PendingBN, activation: str | None) -> torch.Tensor:
        """The rows of ``activation(bn1(x1) [+ bn2(x2)] [+ res])`` for a ``PendingBN`` this backend's
        ``batch_norm`` deferred; ``activation`` is None or one of ``pending_activations``. Differentiable
        like the ops it replaces. Needed only by backends that return ``PendingBatchNorm``."""
        raise NotImplementedError(f"backend {self.name!r} returns no pending BatchNorm")

    # --- elementwise: 0 maps to 0, so every layout shares these ---------------
    def relu(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return fuse_activation(x, "relu") or x.map(lambda v: F.relu(v, inplace=inplace))

    def relu6(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return fuse_activation(x, "relu6") or x.map(lambda v: F.relu6(v, inplace=inplace))

    def leaky_relu(self, x: SparseTensor, negative_slope: float = 0.01, inplace: bool = False) -> SparseTensor:
        return x.map(lambda v: F.leaky_relu(v, negative_slope, inplace))

    def gelu(self, x: SparseTensor, approximate: str = "none") -> SparseTensor:
        return x.map(lambda v: F.gelu(v, approximate=approximate))

    def add(self, a: SparseTensor, b: SparseTensor) -> SparseTensor:
        """``a + b``; a pending BatchNorm on either side stays pending with the other folded in."""
        if not isinstance(b, SparseTensor) or a.index is not b.index or a.stride != b.stride:
            raise ValueError("can only add sparse tensors of the same batch index and stride")
        if a.backend is not b.backend and a.backend.name != b.backend.name:
            raise ValueError(f"cannot add tensors of backends {a.backend.name} and {b.backend.name}")
        return fuse_add(a, b) or a.with_values(a.values + b.values)

    def __repr__(self) -> str:
        return f"<ctssl backend {self.name!r}>"
