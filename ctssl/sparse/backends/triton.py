"""The ``triton`` backend: the packed active-patch layout with Triton kernels (``ctssl.kernels``).

Conv (forward, input and weight gradient), BatchNorm, max pool and the layout
conversions run as Triton kernels, on images and volumes alike (the kernels take the
grid's dimensionality as a constexpr), and ConvNeXt's depthwise conv (images; k up to 7,
stride 1, reading up to 3 patches away) and LayerNorm over channels; average pooling,
stochastic depth, Linear (a GEMM on the rows: cuBLAS), GELU and layer scale reuse the
``torch`` backend's packed ops.

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

from ..index import PatchIndex
from ..norm_stats import NormStats, batch_norm_statistics
from ..pending import PendingBatchNorm, PendingBN, PendingPacked
from ..precision import compute_dtype
from ..tensor import PackedTensor, SparseTensor
from .base import check_aligned, ntuple, pair
from .torch_packed import TorchBackend

try:
    from ctssl.kernels import runtime as _rt
    from ctssl.kernels.batchnorm import BatchNormActFunction, finalize_stats, partial_stats
    from ctssl.kernels.conv import ConvGeometry, SparseConvFunction
    from ctssl.kernels.depthwise import DepthwiseConv2dFunction, DepthwiseConvLayerNormFunction, depthwise_geometry
    from ctssl.kernels.layernorm import LayerNormFunction
    from ctssl.kernels.layout import PackFunction, UnpackFunction
    from ctssl.kernels.pool import MaxPoolFunction
    _IMPORT_ERROR = None
except ImportError as exc:  # triton missing or broken: reported by unavailable_reason()
    _rt = None
    _IMPORT_ERROR = exc

NAME = "triton"


class TritonBackend(TorchBackend):
    name = NAME
    spatial_dims = (2, 3)
    needs = "a CUDA GPU and the triton package (or TRITON_INTERPRET=1 set before import, for CPU tests)"
    pending_activations = frozenset({"relu"})
    pending_pairs = True
    self_check_before_auto = True

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
            if (getattr(_IMPORT_ERROR, "name", None) or "").startswith("ctssl.kernels"):
                import ctssl
                return (f"this ctssl ({os.path.dirname(ctssl.__file__)}) has no ctssl.kernels: install ctssl "
                        "(`pip install .`) or run from a checkout that has kernels/ beside ctssl/")
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
        cache = index.backend_cache(NAME)
        if not cache:
            cache.update(nbr=index.neighbours.to(torch.int32).reshape(-1).contiguous(),
                         coords=index.coords.to(torch.int32).contiguous(),
                         slot=index.slot.to(torch.int32).contiguous())
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
    def _conv(self, x, weight, bias, stride, padding, dilation, groups):
        n, op = x.ndim, f"conv{x.ndim}d"
        out_stride = check_aligned(op, x, weight.shape[2:], stride, padding, dilation)
        if groups != 1:
            return self._depthwise(x, weight, bias, stride, padding, dilation, groups)
        v = self._check(x, op)
        dtype = compute_dtype(v, weight, NAME, op)
        if v.dtype != dtype:
            v = v.to(dtype)
        geom = ConvGeometry(x.patch_side, tuple(weight.shape[2:]), ntuple(stride, n)[0], ntuple(padding, n),
                            ntuple(dilation, n))
        nbr = self._tables(x.index)["nbr"]
        want_stats = self.fuse
        y, stats = SparseConvFunction.apply(v, weight, bias, nbr, geom, x.index.num_patches, want_stats,
                                            self.deterministic)
        return ConvOutput(y, x.index, out_stride, self, stats)

    def _depthwise(self, x, weight, bias, stride, padding, dilation, groups) -> SparseTensor:
        """A depthwise conv (groups = channels, odd square kernel up to 7, stride 1, padding k // 2), kept
        pending so that a LayerNorm reading it fuses with it; any other grouped conv is refused."""
        op = f"conv{x.ndim}d"
        k = tuple(weight.shape[2:])
        if x.ndim != 2:
            raise NotImplementedError(f"backend {NAME!r}: {op} with groups={groups} is not implemented (the "
                                      "depthwise kernels are 2-D; backend 'torch' supports it)")
        if not (groups == x.channels == weight.shape[0] and weight.shape[1] == 1 and pair(stride) == (1, 1)
                and pair(dilation) == (1, 1) and pair(padding) == (k[0] // 2, k[1] // 2)):
            raise NotImplementedError(
                f"backend {NAME!r}: {op} with groups={groups} is implemented only as a depthwise conv (groups = "
                f"channels, stride 1, padding k // 2, dilation 1); got weight {tuple(weight.shape)} on "
                f"{x.channels} channels, stride {stride}, padding {padding}, dilation {dilation} "
                "(backend 'torch' supports it)")
        geom = depthwise_geometry(x.patch_side, k)
        v = self._check(x, op)
        dtype = compute_dtype(v, weight, NAME, op)
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
    def _max_pool(self, x, kernel_size, stride, padding):
        n, op = x.ndim, f"max_pool{x.ndim}d"
        out_stride = check_aligned(op, x, kernel_size, stride, padding)
        k, s, pad = ntuple(kernel_size, n), ntuple(stride, n)[0], ntuple(padding, n)
        if len(set(k)) != 1 or len(set(pad)) != 1:
            raise NotImplementedError(f"backend {NAME!r}: {op} supports equal kernel sides and padding only, "
                                      f"got kernel {k} padding {pad}")
        v = self._check(x, op)
        nbr = self._tables(x.index)["nbr"]
        y = MaxPoolFunction.apply(v, nbr, x.index.num_patches, x.patch_side, k[0], s, pad[0], n)
        return PackedTensor(y, x.index, out_stride, self)

    conv2d = conv3d = _conv
    max_pool2d = max_pool3d = _max_pool

    # --- BatchNorm -----------------------------------------------------------
    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps,
                   process_group=None):
        v = self._check(x, "batch_norm")
        part = x.bn_partials(v) if (self.fuse and isinstance(x, ConvOutput)) else None

        def moments(rows):
            mean, _, var = finalize_stats(part if part is not None else partial_stats(rows), rows.shape[0],
                                          None, None, momentum, eps, False)
            return mean, var

        def fused(rows):  # statistics and the running-statistics update in one launch
            M = rows.shape[0]
            track = running_mean is not None and running_var is not None
            mean, invstd, _ = finalize_stats(part if part is not None else partial_stats(rows), M, running_mean,
                                             running_var, momentum, eps, track and M > 1)
            return NormStats(mean, invstd, M, True)

        stats = batch_norm_statistics(v, running_mean, running_var, training, momentum, eps, process_group,
                                      moments, fused)
        if stats is None:  # nothing visible, nothing to synchronize: like batch_norm_rows, the input
            return PackedTensor(v, x.index, x.stride, self)
        pending = PendingBN(v, stats, weight, bias)  # (a rank without rows still joins the backward all-reduce)
        if not self.fuse:
            return PackedTensor(self.apply_pending(pending, None), x.index, x.stride, self)
        return PendingBatchNorm(pending, x.index, x.stride, self)

    def apply_pending(self, p: PendingBN, activation: str | None) -> torch.Tensor:
        return BatchNormActFunction.apply(activation == "relu", p.stats1, p.stats2, p.x1, p.weight1, p.bias1, p.x2,
                                          p.weight2, p.bias2, p.res)

    # --- elementwise ---------------------------------------------------------
    def relu(self, x: SparseTensor, inplace: bool = False) -> SparseTensor:
        return super().relu(x, inplace=False)  # out of place: autograd may have saved the values


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
