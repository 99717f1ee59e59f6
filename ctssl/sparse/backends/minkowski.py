"""The ``minkowski`` backend: SparK's masked ops through MinkowskiEngine, where it is installed.

MinkowskiEngine 0.5.4 has no wheels: it is source only and unmaintained. Where it
imports, this backend keeps ``TorchBackend``'s packed rows (BatchNorm, ReLU, add,
densify inherited) and runs spatial ops as MinkowskiEngine convolutions in
dimension 2. A map at feature stride s is a coordinate map of tensor stride s
whose coordinates are the visible pixels (b, s*y, s*x), inserted once per batch and
stride into one ``CoordinateManager`` cached on the ``PatchIndex``. Every conv and
pool names that map of its *output* stride as its output, so the result lies exactly
on the visible pixels at the output resolution (no dilated active set).

1x1 convs are matmuls on the rows (inherited); average pooling and grouped convs use
the inherited halo path. MinkowskiEngine computes in float32 (float64 on CPU); other
dtypes are cast with a warning.
"""
from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

from ..index import PatchIndex
from ..tensor import PackedTensor, SparseTensor
from .base import Backend, check_aligned, pair
from .spconv import packed_pixels
from .torch_packed import TorchBackend

BUILD_HINT = (
    "MinkowskiEngine has no wheels: 0.5.4 is source only and unmaintained (pip install fails). Build it from its "
    "sdist (`SETUPTOOLS_USE_DISTUTILS=stdlib pip download MinkowskiEngine==0.5.4 --no-deps --no-binary :all: "
    "--no-build-isolation`: those flags get its metadata step past numpy.distutils): on Python >= 3.10 replace "
    "`from collections import Sequence` by `from collections.abc import Sequence` in its Python files, then on "
    "CPU install Debian's libopenblas-dev and run `python setup.py bdist_wheel --blas=openblas --cpu_only` "
    "(GPU builds fail with CUDA 12)"
)


class MinkowskiBackend(TorchBackend):
    """Packed rows, spatial ops through MinkowskiEngine convolutions (dimension 2)."""

    name = "minkowski"
    spatial_dims = (2,)  # coordinate maps and kernels of dimension 2 only
    needs = BUILD_HINT
    supported_ops = Backend.supported_ops | {"instance_norm"}  # the torch backend's, on rows
    unsupported_ops_reason = ("MinkowskiEngine has no depthwise convolution, so no ConvNeXt; its LayerNorm/Linear/"
                              "GELU would be the torch backend's")

    def __init__(self):
        self._me = None
        self._modes = None
        self._reason: str | None = None
        self._warned_dtype = False

    # --- availability ---------------------------------------------------------
    def _engine(self):
        if self._me is None and self._reason is None:
            try:
                self._me = importlib.import_module("MinkowskiEngine")
                self._modes = importlib.import_module("MinkowskiEngineBackend._C").ConvolutionMode
            except Exception as exc:  # a half-built engine raises more than ImportError
                self._reason = f"MinkowskiEngine failed to import ({type(exc).__name__}: {exc})"
        return self._me

    def unavailable_reason(self) -> str | None:
        if self._engine() is not None:
            return None
        return f"{self._reason}. {BUILD_HINT}"

    def check_device(self, device: torch.device) -> None:
        device = torch.device(device)
        me = self._engine()
        if device.type == "cuda" and me is not None and not me.is_cuda_available():
            from . import BackendUnavailableError

            raise BackendUnavailableError("backend minkowski: this MinkowskiEngine is a CPU-only build "
                                          "(--cpu_only); run on CPU or choose another backend")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend minkowski runs on CPU or CUDA devices, not {device.type}")

    # --- per-batch coordinate maps, cached on the index -------------------------
    def _maps(self, index: PatchIndex, device: torch.device) -> dict:
        cache = index.backend_cache(self.name)
        if "manager" not in cache:
            me = self._engine()
            kind = me.CoordinateMapType.GPU if device.type == "cuda" else me.CoordinateMapType.CPU
            cache["manager"] = me.CoordinateManager(D=2, coordinate_map_type=kind)
        return cache

    def _map(self, index: PatchIndex, stride: int, device: torch.device):
        """(key, rows of the map in packed order or None if identical) of the visible pixels at ``stride``."""
        cache = self._maps(index, device)
        if stride not in cache:
            b, y, x = packed_pixels(index, stride)
            coords = torch.stack([b, y * stride, x * stride], dim=1).to(torch.int32).contiguous()
            if device.type == "cpu":
                coords = coords.cpu()
            key, (unique, inverse) = cache["manager"].insert_and_map(coords, [stride, stride], "ctssl")
            unique, inverse = unique.long().to(device), inverse.long().to(device)
            identity = torch.equal(unique, torch.arange(unique.numel(), device=device))
            cache[stride] = (key, None if identity else (unique, inverse))
        return cache[stride]

    def _masked_window(self, index: PatchIndex, stride: int, kernel, step, padding) -> torch.Tensor:
        """Per output row (packed order): does its pooling window hold an in-image masked pixel?"""
        cache = self._maps(index, index.device)
        key = ("masked_window", stride, kernel, step, padding)
        if key not in cache:
            masked = (~index.dense_mask(stride)).to(torch.float32)
            hit = F.max_pool2d(masked, kernel, step, padding) > 0  # -inf padding: outside is not masked
            b, y, x = packed_pixels(index, stride * step[0])
            cache[key] = hit[b, 0, y, x]
        return cache[key]

    def _compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        if dtype == torch.float32 or (dtype == torch.float64 and device.type == "cpu"):
            return dtype
        if not self._warned_dtype:
            warnings.warn(f"backend minkowski: MinkowskiEngine computes in float32; {dtype} maps are cast to "
                          f"float32 and back", stacklevel=3)
            self._warned_dtype = True
        return torch.float32

    def _apply(self, x: SparseTensor, out_stride: int, call) -> torch.Tensor:
        """Run ``call(features, in_key, out_key, manager)`` on ME's row order, return packed rows."""
        device = x.values.device
        in_key, in_perm = self._map(x.index, x.stride, device)
        out_key, out_perm = self._map(x.index, out_stride, device)
        manager = self._maps(x.index, device)["manager"]
        feats = x.values if in_perm is None else x.values.index_select(0, in_perm[0])
        y = call(feats, in_key, out_key, manager)
        return y if out_perm is None else y.index_select(0, out_perm[1])

    # --- ops ---------------------------------------------------------------
    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        k, s, d = pair(weight.shape[-2:]), pair(stride), pair(dilation)
        if groups != 1 or k == (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0:
            # pointwise: matmul on rows; grouped and even kernels: ME has no groups, centres even kernels
            # differently from torch's padding: the inherited halo path
            return super().conv2d(x, weight, bias, stride, padding, dilation, groups)
        cout = weight.shape[0]
        if x.index.num_patches == 0:
            return PackedTensor(x.values.new_zeros(0, cout), x.index, out_stride, self)
        me = self._engine()
        dtype = self._compute_dtype(x.values.dtype, x.values.device)
        generator = me.KernelGenerator(kernel_size=list(k), stride=list(s), dilation=list(d), dimension=2)
        # ME's kernel is (k*k, Cin, Cout), its tap index running over y fastest (checked against dense)
        kernel = weight.to(dtype).permute(3, 2, 1, 0).reshape(k[0] * k[1], weight.shape[1], cout).contiguous()

        def call(feats, in_key, out_key, manager):
            return me.MinkowskiConvolutionFunction.apply(feats.to(dtype).contiguous(), kernel, generator,
                                                         self._modes.DEFAULT, in_key, out_key, manager)

        y = self._apply(x, out_stride, call)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return PackedTensor(y.to(x.values.dtype), x.index, out_stride, self)

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        k, s, pad = pair(kernel_size), pair(stride), pair(padding)
        if k[0] % 2 == 0 or k[1] % 2 == 0:
            return super().max_pool2d(x, kernel_size, stride, padding)
        if x.index.num_patches == 0:
            return PackedTensor(x.values, x.index, out_stride, self)
        me = self._engine()
        dtype = self._compute_dtype(x.values.dtype, x.values.device)
        generator = me.KernelGenerator(kernel_size=list(k), stride=list(s), dilation=1, dimension=2)

        def call(feats, in_key, out_key, manager):
            return me.MinkowskiLocalPoolingFunction.apply(feats.to(dtype).contiguous(),
                                                          me.PoolingMode.LOCAL_MAX_POOLING, generator, in_key,
                                                          out_key, manager)

        y = self._apply(x, out_stride, call)
        # SparK's masked pixels read 0: a window that holds one cannot have a negative maximum
        touches = self._masked_window(x.index, x.stride, k, s, pad).unsqueeze(1)
        y = torch.where(touches, y.clamp_min(0), y)
        return PackedTensor(y.to(x.values.dtype), x.index, out_stride, self)

