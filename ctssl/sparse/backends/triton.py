"""The ``triton`` backend: the packed active-patch layout with Triton kernels (``ctssl.kernels``).

Conv (forward, input and weight gradient), BatchNorm, max pool and the layout
conversions run as Triton kernels, and ConvNeXt's depthwise conv (k up to 7, stride 1,
reading up to 3 patches away) and LayerNorm over channels; average pooling, stochastic
depth, Linear (a GEMM on the rows: cuBLAS), GELU and layer scale reuse the ``torch``
backend's packed ops.

Fusion, all exact in semantics:
- every conv writes the BatchNorm statistics of its output in its epilogue, so a
  training-mode BatchNorm right after a conv does not re-read the conv output;
- ``batch_norm`` returns a *pending* tensor: the statistics are final (running
  stats are updated at once) but the normalisation is applied when the result is
  first used. ``relu(bn(x))``, ``bn(x) + r`` and ``relu(bn(x) + r)`` / ``relu(bn(x) +
  bn(z))`` then run as one kernel (forward and backward); any other use of the
  pending tensor's ``values`` applies the BatchNorm alone;
- a depthwise conv returns a *pending* tensor too: a LayerNorm read of it (ConvNeXt's
  ``norm(conv_dw(x))``) runs conv and LayerNorm as one kernel; any other read runs the
  conv alone.

Modes: ``TritonBackend(deterministic=True)``, ``CTSSL_DETERMINISTIC=1`` or
``torch.use_deterministic_algorithms(True)`` give bitwise-reproducible results (no
atomics, fixed launch configs); otherwise weight gradients add row splits with
fp32 atomics and GEMM block sizes are autotuned on the GPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..index import PatchIndex
from ..pending import PendingBatchNorm, PendingPacked, fuse_activation, fuse_add
from ..tensor import PackedTensor, SparseTensor
from .base import check_aligned, pair
from .torch_packed import TorchBackend

try:
    from ctssl.kernels import runtime as _rt
    from ctssl.kernels.batchnorm import BatchNormActFunction, batch_stats, running_stats
    from ctssl.kernels.conv import ConvGeometry, SparseConv2dFunction
    from ctssl.kernels.depthwise import DepthwiseConv2dFunction, DepthwiseConvLayerNormFunction, depthwise_geometry
    from ctssl.kernels.layernorm import LayerNormFunction
    from ctssl.kernels.layout import PackFunction, UnpackFunction
    from ctssl.kernels.pool import MaxPool2dFunction
    _IMPORT_ERROR = None
except ImportError as exc:  # triton missing or broken: reported by unavailable_reason()
    _rt = None
    _IMPORT_ERROR = exc

NAME = "triton"


class TritonBackend(TorchBackend):
    name = NAME
    needs = "a CUDA GPU and the triton package (or TRITON_INTERPRET=1 set before import, for CPU tests)"

    def __init__(self, deterministic: bool | None = None, fuse: bool = True):
        """``deterministic``: None follows CTSSL_DETERMINISTIC=1 / torch's deterministic flag.

        ``fuse=False`` turns off the pending BatchNorm, the conv-epilogue statistics and the
        depthwise conv + LayerNorm kernel (for A/B checks); results are the same up to rounding.
        """
        self._deterministic = deterministic
        self.fuse = fuse

    @property
    def deterministic(self) -> bool:
        if self._deterministic is not None:
            return self._deterministic
        return os.environ.get("CTSSL_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()

    # --- availability --------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        if _IMPORT_ERROR is not None:
            return f"triton could not be imported ({_IMPORT_ERROR}); install it with `pip install triton`"
        if _rt.INTERPRET or torch.cuda.is_available():
            return None
        return ("no CUDA GPU is visible; the Triton kernels need one "
                "(or TRITON_INTERPRET=1 set before import to run them on CPU, slowly, for tests)")

    def check_device(self, device: torch.device) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise ValueError(f"backend {NAME!r}: {reason}")
        device = torch.device(device)
        if device.type == "cuda" and not _rt.INTERPRET:
            return
        if device.type == "cpu" and _rt.INTERPRET:
            return
        if device.type == "cpu":
            raise ValueError(f"backend {NAME!r}: CPU tensors need TRITON_INTERPRET=1 set before triton is imported "
                             "(tests only); on CPU use backend 'torch'")
        raise ValueError(f"backend {NAME!r}: cannot run on {device}: the kernels were compiled for "
                         + ("the CPU interpreter (TRITON_INTERPRET=1)" if _rt.INTERPRET else "CUDA GPUs"))

    # --- per-batch tables ----------------------------------------------------
    def _tables(self, index: PatchIndex) -> dict:
        """int32 neighbour, coordinate and slot tables, built once per batch and kept on the index."""
        cache = index.__dict__.get("_triton_cache")
        if cache is None:
            cache = {
                "nbr": index.neighbours.to(torch.int32).reshape(-1).contiguous(),
                "coords": index.coords.to(torch.int32).contiguous(),
                "slot": index.slot.to(torch.int32).contiguous(),
            }
            index._triton_cache = cache
        return cache

    def _neighbours(self, index: PatchIndex, radius: int) -> torch.Tensor:
        """The flat int32 radius-``radius`` neighbour table, built once per batch."""
        cache = self._tables(index)
        key = f"nbr{radius}"
        if key not in cache:
            cache[key] = index.neighbour_table(radius).to(torch.int32).reshape(-1).contiguous()
        return cache[key]

    def _check(self, x: SparseTensor, op: str) -> torch.Tensor:
        if not isinstance(x, PackedTensor):
            raise TypeError(f"backend {NAME!r}: {op} needs a packed tensor, got {type(x).__name__} "
                            f"of backend {x.backend.name!r}")
        v = x.values
        self.check_device(v.device)
        if v.dtype not in _rt.STORAGE_DTYPES:
            raise TypeError(f"backend {NAME!r}: {op} got {v.dtype} values; the kernels take float32, float16 "
                            "and bfloat16 (use backend 'torch' for float64)")
        return v.contiguous()

    # --- layout --------------------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        self.check_device(images.device)
        if images.dtype not in _rt.STORAGE_DTYPES:
            raise TypeError(f"backend {NAME!r}: images are {images.dtype}; the kernels take float32, float16 "
                            "and bfloat16")
        t = self._tables(index)
        rows = PackFunction.apply(images, t["coords"], t["slot"], index.patch_size)
        return PackedTensor(rows, index, 1, self)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        v = self._check(x, "to_dense")
        t = self._tables(x.index)
        return UnpackFunction.apply(v, None, t["coords"], t["slot"], x.dense_shape, x.patch_side)

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        v = self._check(x, "densify")
        if token.numel() != x.channels:
            raise ValueError(f"backend {NAME!r}: densify token has {token.numel()} entries, expected one per "
                             f"channel ({x.channels})")
        t = self._tables(x.index)
        return UnpackFunction.apply(v, token, t["coords"], t["slot"], x.dense_shape, x.patch_side)

    # --- conv ----------------------------------------------------------------
    def _compute_dtype(self, values: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        """Autocast's dtype when autocast is on for this device (like F.conv2d), else the input's."""
        dev = values.device.type
        try:
            enabled = torch.is_autocast_enabled(dev)
            dtype = torch.get_autocast_dtype(dev) if enabled else None
        except (TypeError, AttributeError):  # torch < 2.4 spelling
            enabled = dev == "cuda" and torch.is_autocast_enabled()
            dtype = torch.get_autocast_gpu_dtype() if enabled else None
        if enabled:
            return dtype
        if weight.dtype != values.dtype:
            raise TypeError(f"backend {NAME!r}: conv2d input is {values.dtype} but its weight is {weight.dtype}; "
                            "cast the model or run under torch.autocast")
        return values.dtype

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        if groups != 1:
            return self._depthwise(x, weight, bias, stride, padding, dilation, groups)
        v = self._check(x, "conv2d")
        dtype = self._compute_dtype(v, weight)
        if v.dtype != dtype:
            v = v.to(dtype)
        geom = ConvGeometry(x.patch_side, tuple(weight.shape[-2:]), pair(stride)[0], pair(padding), pair(dilation))
        nbr = self._tables(x.index)["nbr"]
        want_stats = self.fuse
        y, stats = SparseConv2dFunction.apply(v, weight, bias, nbr, geom, x.index.num_patches, want_stats,
                                              self.deterministic)
        return ConvOutput(y, x.index, out_stride, self, stats)

    def _depthwise(self, x, weight, bias, stride, padding, dilation, groups) -> SparseTensor:
        """A depthwise conv (groups = channels, odd square kernel up to 7, stride 1, padding k // 2), kept
        pending so that a LayerNorm reading it fuses with it; any other grouped conv is refused."""
        k = tuple(weight.shape[-2:])
        if not (groups == x.channels == weight.shape[0] and weight.shape[1] == 1 and pair(stride) == (1, 1)
                and pair(dilation) == (1, 1) and pair(padding) == (k[0] // 2, k[1] // 2)):
            raise NotImplementedError(
                f"backend {NAME!r}: conv2d with groups={groups} is implemented only as a depthwise conv (groups = "
                f"channels, stride 1, padding k // 2, dilation 1); got weight {tuple(weight.shape)} on "
                f"{x.channels} channels, stride {stride}, padding {padding}, dilation {dilation} "
                "(backend 'torch' supports it)")
        geom = depthwise_geometry(x.patch_side, k)
        v = self._check(x, "conv2d")
        dtype = self._compute_dtype(v, weight)
        if v.dtype != dtype:
            v = v.to(dtype)
        nbr = self._neighbours(x.index, geom.radius)
        out = PendingDepthwise(v, weight, bias, nbr, geom, x.index, x.stride, self)
        return out if self.fuse else out.with_values(out.values)

    # --- LayerNorm -----------------------------------------------------------
    def layer_norm(self, x, weight, bias, eps):
        if self.fuse and isinstance(x, PendingDepthwise) and x.unapplied:
            y = DepthwiseConvLayerNormFunction.apply(x.rows, x.weight, x.bias, weight, bias, eps, x.nbr, x.geom,
                                                     x.index.num_patches, self.deterministic)
        else:
            y = LayerNormFunction.apply(self._check(x, "layer_norm"), weight, bias, eps)
        return PackedTensor(y, x.index, x.stride, self)

    # --- pooling -------------------------------------------------------------
    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        (kh, kw), (s, _), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
        if kh != kw or ph != pw:
            raise NotImplementedError(f"backend {NAME!r}: max_pool2d supports square kernels and padding only, "
                                      f"got kernel {(kh, kw)} padding {(ph, pw)}")
        v = self._check(x, "max_pool2d")
        nbr = self._tables(x.index)["nbr"]
        y = MaxPool2dFunction.apply(v, nbr, x.index.num_patches, x.patch_side, kh, s, ph)
        return PackedTensor(y, x.index, out_stride, self)

    # --- BatchNorm -----------------------------------------------------------
    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        v = self._check(x, "batch_norm")
        use_batch_stats = training or running_mean is None
        group = process_group if _distributed(process_group) else None
        M = v.shape[0]
        if use_batch_stats:
            part = x.bn_partials(v) if (self.fuse and isinstance(x, ConvOutput)) else None
            with torch.no_grad():
                stats = batch_stats(v.detach(), part, running_mean, running_var, momentum, eps, group)
            if stats.count == 0:  # no visible row anywhere: like batch_norm_rows, return the input
                return PackedTensor(v, x.index, x.stride, self)
        else:
            stats = running_stats(running_mean, running_var, eps)
        if M == 0 and group is None:
            return PackedTensor(v, x.index, x.stride, self)
        pending = _PendingBN(v, stats, weight, bias)  # (a rank without rows still joins the backward all-reduce)
        if not self.fuse:
            return PackedTensor(self._apply(pending, None), x.index, x.stride, self)
        return PendingBatchNorm(pending, x.index, x.stride, self)

    def _apply(self, p: "_PendingBN", activation: str | None) -> torch.Tensor:
        return BatchNormActFunction.apply(activation == "relu", p.s1, p.s2, p.x1, p.w1, p.b1, p.x2, p.w2, p.b2, p.res)

    # --- elementwise ---------------------------------------------------------
    def relu(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return fuse_activation(x, "relu", self) or x.map(F.relu)  # out of place: autograd may have saved the values

    def add(self, a: SparseTensor, b: SparseTensor) -> SparseTensor:
        if not isinstance(b, SparseTensor) or a.index is not b.index or a.stride != b.stride:
            raise ValueError("can only add sparse tensors of the same batch index and stride")
        if a.backend is not b.backend and a.backend.name != b.backend.name:
            raise ValueError(f"cannot add tensors of backends {a.backend.name} and {b.backend.name}")
        return fuse_add(a, b, self) or a.with_values(a.values + b.values)


def _distributed(process_group) -> bool:
    """Synchronize only when a process group is given (SyncBatchNorm) and it has several ranks."""
    return (process_group is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


class ConvOutput(PackedTensor):
    """A conv's packed output, carrying the BN statistics its epilogue computed."""

    __slots__ = ("_partials", "_source")

    def __init__(self, values, index, stride, backend, partials=None):
        super().__init__(values, index, stride, backend)
        self._partials = partials
        self._source = (values, values._version)

    def bn_partials(self, values: torch.Tensor):
        """The epilogue's statistics if ``values`` are still the conv's unmodified output, else None."""
        src, version = self._source
        if self._partials is None or values is not src or values._version != version:
            return None
        return self._partials

    def with_values(self, values, stride=None):
        return PackedTensor(values, self.index, self.stride if stride is None else stride, self.backend)


class PendingDepthwise(PendingPacked):
    """A depthwise conv's output, computed on first read unless a LayerNorm fuses with it."""

    __slots__ = ("rows", "weight", "bias", "nbr", "geom")

    def __init__(self, rows, weight, bias, nbr, geom, index, stride, backend):
        self.rows, self.weight, self.bias, self.nbr, self.geom = rows, weight, bias, nbr, geom
        super().__init__(index, stride, backend)

    def _compute(self) -> torch.Tensor:
        return DepthwiseConv2dFunction.apply(self.rows, self.weight, self.bias, self.nbr, self.geom,
                                             self.index.num_patches, self.backend.deterministic)

    @property
    def channels(self) -> int:
        return self.rows.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device


class _PendingBN:
    """``bn1(x1) [+ bn2(x2)] [+ res]``: a BatchNorm (pair) whose statistics are known, not yet applied."""

    __slots__ = ("x1", "s1", "w1", "b1", "x2", "s2", "w2", "b2", "res")

    def __init__(self, x1, s1, w1, b1, x2=None, s2=None, w2=None, b2=None, res=None):
        self.x1, self.s1, self.w1, self.b1 = x1, s1, w1, b1
        self.x2, self.s2, self.w2, self.b2, self.res = x2, s2, w2, b2, res

    @property
    def single(self) -> bool:
        return self.x2 is None and self.res is None

    def plus(self, other: SparseTensor) -> "_PendingBN | None":
        """This single BN plus ``other`` as one pending op, or None when they cannot be fused."""
        if not self.single:
            return None
        if isinstance(other, PendingBatchNorm) and other.unapplied and other.pending.single:
            o = other.pending
            if o.x1.dtype == self.x1.dtype and o.s1.group is self.s1.group:
                return _PendingBN(self.x1, self.s1, self.w1, self.b1, o.x1, o.s1, o.w1, o.b1)
        r = other.values
        if r.dtype == self.x1.dtype and r.shape == self.x1.shape:
            return _PendingBN(self.x1, self.s1, self.w1, self.b1, res=r.contiguous())
        return None
