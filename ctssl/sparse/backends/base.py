"""The backend interface: the few operations a masked ResNet or ConvNeXt needs.

Every backend implements the semantics of design.md section 2 (the ``dense``
backend *is* that definition). Elementwise operations are shared here because
they map 0 to 0 in any layout.

A model states the ops it needs (an encoder's ``sparse_ops``, names from ``OPS``) and a
backend the ops it has (``supported_ops``); ``check_ops`` refuses a model a backend cannot
run, with the reason, when its input is built (``ctssl.sparse.sparse_input(..., ops=)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..index import PatchIndex
from ..tensor import SparseTensor


OPS: dict[str, str] = {
    "conv": "convolution with groups=1 (conv2d / conv3d), any aligned kernel, stride, padding, dilation",
    "depthwise_conv": "depthwise k x k convolution (conv2d / conv3d with groups = channels), stride 1",
    "batch_norm": "BatchNorm over visible positions",
    "layer_norm": "LayerNorm over the channels of each visible position",
    "linear": "a Linear over the channels of each visible position",
    "max_pool": "max pooling",
    "avg_pool": "average pooling",
    "relu": "ReLU / ReLU6",
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
    supported_ops: frozenset[str] = RESNET_OPS | {"avg_pool"}
    unsupported_ops_reason: str = "not implemented in this backend"
    """Why the ops missing from ``supported_ops`` are missing (shown when a model needs them)."""

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
        raise NotImplementedError

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

    # --- elementwise: 0 maps to 0, so every layout shares these ---------------
    def relu(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return x.map(lambda v: F.relu(v, inplace=inplace))

    def relu6(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return x.map(lambda v: F.relu6(v, inplace=inplace))

    def gelu(self, x: SparseTensor, approximate: str = "none") -> SparseTensor:
        return x.map(lambda v: F.gelu(v, approximate=approximate))

    def add(self, a: SparseTensor, b: SparseTensor) -> SparseTensor:
        if not isinstance(b, SparseTensor) or a.index is not b.index or a.stride != b.stride:
            raise ValueError("can only add sparse tensors of the same batch index and stride")
        if a.backend is not b.backend and a.backend.name != b.backend.name:
            raise ValueError(f"cannot add tensors of backends {a.backend.name} and {b.backend.name}")
        return a.with_values(a.values + b.values)

    def __repr__(self) -> str:
        return f"<ctssl backend {self.name!r}>"
