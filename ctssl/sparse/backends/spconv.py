"""The ``spconv`` backend: SparK's masked ops through spconv 2.x (or spconv-triton).

The fallback where no custom kernel fits. Rows stay in ``TorchBackend``'s packed
order (slot-major, row-major inside a patch), so BatchNorm, ReLU, add, densify and
stochastic depth are inherited unchanged; only the spatial ops go through spconv,
whose pixel-level ``SparseConvTensor`` is built on the same rows with (b, y, x)
indices ((b, z, y, x) for volumes) cached on the ``PatchIndex`` per stride
(``index.backend_cache("spconv")``). Images use spconv's 2-D modules, volumes its 3-D ones:

- stride-1 k x k conv: ``SubMConv2d`` / ``SubMConv3d`` (outputs at the input pixels, in their order);
- strided conv and max pool: ``SparseConvNd`` / ``SparseMaxPoolNd`` produce the
  *dilated* active set in their own order; the visible output pixels (a subset,
  because the patch grid is aligned) are gathered from it, restricting the output
  to the visible patches at the output resolution;
- 1x1 convs are matmuls on the rows (what spconv itself does for a 1x1 SubM conv);
- average pooling and grouped convs have no spconv counterpart with SparK's
  semantics (spconv averages over active sites, has no groups): inherited halo path.

Weights stay the torch module's ``(Cout, Cin, *kernel)`` tensor; every call permutes
it to spconv's KRSC layout ``(Cout, *kernel, Cin)``, differentiably. spconv computes a
cross-correlation like torch (no kernel flip), which the tests check against dense.

spconv's CPU build runs forward only and is wrong with several threads: CPU calls
run on one thread, and a backward through them raises ``SPCONV_CPU_NO_BACKWARD``.
Neither spconv nor spconv-triton has bf16 kernels: bf16 is computed in float32.
"""
from __future__ import annotations

import importlib
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..index import PatchIndex
from ..tensor import PackedTensor, SparseTensor
from .base import Backend, check_aligned, ntuple
from .torch_packed import TorchBackend

INSTALL_HINT = (
    "install spconv 2.x: `pip install spconv-cu126` (GPU, with cumm-cu126), `pip install spconv-triton` "
    "(GPU, pure Python on Triton) or `pip install spconv==2.3.8 cumm==0.7.11` (CPU, forward only)"
)
SPCONV_CPU_NO_BACKWARD = (
    "backend 'spconv': spconv's CPU build has no backward (it runs forward only); run the backward on a CUDA "
    "GPU (spconv-cu12x or spconv-triton) or choose another backend (torch, dense)"
)
IMPLEMENTATIONS = {"spconv": "spconv.pytorch", "spconv_triton": "spconv_triton.pytorch"}


@contextmanager
def single_thread():
    """Run the body on one intra-op thread: spconv's CPU kernels are wrong with more."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _ForwardOnlyOnCpu(torch.autograd.Function):
    """Runs a spconv CPU call (single-threaded) and refuses the backward with a clear error."""

    @staticmethod
    def forward(ctx, fn, values, weight, bias):
        with single_thread():
            return fn(values, weight, bias)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(SPCONV_CPU_NO_BACKWARD)


def packed_pixels(index: PatchIndex, stride: int) -> tuple[torch.Tensor, ...]:
    """Sample, then row and column (volumes: depth, row, column) at ``stride`` of every packed row, in the
    packed order."""
    p, nd = index.patch_side(stride), index.ndim
    side = torch.arange(p, device=index.device)
    local = [g.reshape(1, -1) for g in torch.meshgrid(*([side] * nd), indexing="ij")]  # row-major in the patch
    b = index.coords[:, :1].expand(-1, p ** nd).reshape(-1)
    return (b, *((index.coords[:, 1 + a:2 + a] * p + local[a]).reshape(-1) for a in range(nd)))


def _import(module: str):
    """The spconv namespace ``module`` or the reason it cannot be used."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # spconv raises more than ImportError (cumm version checks)
        return None, f"{module} failed to import ({type(exc).__name__}: {exc})"


def _spconv_has_gpu() -> bool:
    """Whether the real spconv is a CUDA build (its CPU wheel runs on CPU only)."""
    try:
        from spconv.cppconstants import CPU_ONLY_BUILD
    except Exception:
        return False
    return not CPU_ONLY_BUILD


class SpconvBackend(TorchBackend):
    """Packed rows, spatial ops through spconv (``impl``: "spconv", "spconv_triton" or None = auto)."""

    name = "spconv"
    spatial_dims = (2, 3)
    needs = INSTALL_HINT
    supported_ops = Backend.supported_ops | {"instance_norm"}  # the torch backend's, on rows
    unsupported_ops_reason = ("spconv has no depthwise convolution, so no ConvNeXt; its LayerNorm/Linear/GELU "
                              "would be the torch backend's")

    def __init__(self, impl: str | None = None):
        if impl is not None and impl not in IMPLEMENTATIONS:
            raise ValueError(f"backend spconv: impl must be one of {sorted(IMPLEMENTATIONS)} or None, got {impl!r}")
        self.impl = impl
        self._namespaces: dict[str, object] = {}
        self._reasons: dict[str, str] = {}
        self._modules: dict[tuple, torch.nn.Module] = {}
        self._warned_bf16 = False

    # --- availability ---------------------------------------------------------
    def _namespace(self, impl: str):
        if impl not in self._namespaces and impl not in self._reasons:
            ns, reason = _import(IMPLEMENTATIONS[impl])
            if ns is None:
                self._reasons[impl] = reason
            else:
                self._namespaces[impl] = ns
        return self._namespaces.get(impl)

    def unavailable_reason(self) -> str | None:
        candidates = [self.impl] if self.impl else list(IMPLEMENTATIONS)
        if any(self._namespace(c) is not None for c in candidates):
            return None
        why = "; ".join(self._reasons[c] for c in candidates)
        return f"spconv is not installed ({why}); {INSTALL_HINT}"

    def _impl_for(self, device: torch.device) -> str:
        """Which spconv serves ``device``: the real one where it can, spconv-triton on GPUs otherwise."""
        if device.type == "cpu":
            order = ["spconv"]
        elif device.type == "cuda":
            order = ["spconv", "spconv_triton"]
        else:
            raise ValueError(f"backend spconv runs on CPU or CUDA devices, not {device.type}")
        if self.impl is not None:
            order = [i for i in order if i == self.impl]
        for impl in order:
            ns = self._namespace(impl)
            if ns is None:
                continue
            if device.type == "cuda" and impl == "spconv" and not _spconv_has_gpu():
                self._reasons.setdefault("spconv_gpu", "the installed spconv is its CPU-only build")
                continue
            return impl
        from . import BackendUnavailableError

        why = "; ".join(self._reasons.values()) or "no spconv implementation"
        where = ("CPU (spconv-triton is GPU only; the CPU build is `pip install spconv==2.3.8 cumm==0.7.11`)"
                 if device.type == "cpu" else "CUDA (needs spconv-cu12x or spconv-triton)")
        raise BackendUnavailableError(f"backend spconv cannot run on {where}: {why}")

    def check_device(self, device: torch.device) -> None:
        self._impl_for(torch.device(device))

    def training_unsupported_reason(self, device: torch.device) -> str | None:
        if torch.device(device).type == "cpu":
            return ("spconv's CPU build runs forward only (no backward): train with backend 'torch' on the CPU, "
                    "or with spconv on a CUDA GPU (spconv-cu12x or spconv-triton)")
        return None

    # --- per-batch tables, cached on the index --------------------------------
    def _cache(self, index: PatchIndex) -> dict:
        return index.backend_cache(self.name)

    def _pixels(self, index: PatchIndex, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, [z,] y, x) of every packed row at ``stride``: int32 ``(M, 1 + ndim)`` contiguous, and flat keys."""
        cache = self._cache(index)
        key = ("pixels", stride)
        if key not in cache:
            pixels = packed_pixels(index, stride)
            # spconv silently computes garbage from non-contiguous indices: force the layout
            indices = torch.stack(pixels, dim=1).to(torch.int32).contiguous()
            cache[key] = (indices, _flat_keys(pixels, self._spatial(index, stride)))
        return cache[key]

    def _spatial(self, index: PatchIndex, stride: int) -> list[int]:
        return list(index.dense_grid(stride))

    def _sparse(self, sp, impl: str, features: torch.Tensor, x: SparseTensor, training: bool):
        """A SparseConvTensor on the packed rows, sharing this stride's cached SubM pairs."""
        indices, _ = self._pixels(x.index, x.stride)
        pairs = self._cache(x.index).setdefault(("pairs", x.stride, impl, training), {})
        return sp.SparseConvTensor(features, indices, self._spatial(x.index, x.stride), x.index.batch_size,
                                   indice_dict=pairs)

    def _visible_rows(self, out, index: PatchIndex, stride: int) -> torch.Tensor:
        """Positions in spconv's output of the visible pixels at ``stride``, in packed order."""
        spatial = self._spatial(index, stride)
        keys = _flat_keys(out.indices.long().unbind(1), spatial)
        table = torch.full((index.batch_size * math.prod(spatial),), -1, dtype=torch.long, device=keys.device)
        table[keys] = torch.arange(keys.numel(), device=keys.device)
        rows = table[self._pixels(index, stride)[1]]
        if bool((rows < 0).any()):
            raise RuntimeError("backend spconv: spconv's output misses visible pixels (inconsistent indices)")
        return rows

    def _masked_window(self, index: PatchIndex, stride: int, kernel, step, padding) -> torch.Tensor:
        """Per output row: does its pooling window hold an in-image masked pixel (which reads 0)?"""
        cache = self._cache(index)
        key = ("masked_window", stride, kernel, step, padding)
        if key not in cache:
            masked = (~index.dense_mask(stride)).to(torch.float32)
            pool = F.max_pool3d if index.ndim == 3 else F.max_pool2d
            hit = pool(masked, kernel, step, padding) > 0  # max_pool pads with -inf: outside is not masked
            cache[key] = hit.reshape(-1)[self._pixels(index, stride * step[0])[1]]
        return cache[key]

    # --- dtype and dispatch ------------------------------------------------
    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype != torch.bfloat16:
            return dtype
        if not self._warned_bf16:
            warnings.warn("backend spconv: spconv and spconv-triton have no bf16 kernels; bf16 maps are cast to "
                          "float32 for them (under autocast spconv casts to fp16 itself) and back to bf16; use fp16 "
                          "autocast, or another backend, for half precision", stacklevel=3)
            self._warned_bf16 = True
        return torch.float32

    def _run(self, fn, values, weight=None, bias=None):
        """Call ``fn(values, weight, bias)``; on CPU single-threaded and forward only."""
        if values.device.type != "cpu":
            return fn(values, weight, bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (values, weight, bias)):
            return _ForwardOnlyOnCpu.apply(fn, values, weight, bias)
        with single_thread():
            return fn(values, weight, bias)

    def _module(self, sp, impl: str, kind: str, **kw) -> torch.nn.Module:
        """One spconv module per configuration; its own parameters are never used (functional_call)."""
        key = (impl, kind, tuple(sorted(kw.items())))
        if key not in self._modules:
            self._modules[key] = getattr(sp, kind)(**kw)
        return self._modules[key]

    # --- ops ---------------------------------------------------------------
    def _conv(self, x, weight, bias, stride, padding, dilation, groups):
        nd, op = x.ndim, f"conv{x.ndim}d"
        out_stride = check_aligned(op, x, weight.shape[2:], stride, padding, dilation)
        k, s, pad, d = tuple(weight.shape[2:]), ntuple(stride, nd), ntuple(padding, nd), ntuple(dilation, nd)
        if groups != 1:
            return super()._conv(x, weight, bias, stride, padding, dilation, groups)
        if x.values.shape[1] != weight.shape[1]:
            raise ValueError(f"backend spconv {op}: input has {x.values.shape[1]} channels, the weight "
                             f"{tuple(weight.shape)} expects {weight.shape[1]}")
        if set(k) == {1}:  # pointwise: a matmul on the rows
            return super()._conv(x, weight, bias, stride, padding, dilation, groups)
        cout, cin = weight.shape[0], weight.shape[1]
        if x.index.num_patches == 0:  # nothing visible: the torch path keeps the (empty) graph
            return super()._conv(x, weight, bias, stride, padding, dilation, groups)
        impl = self._impl_for(x.values.device)
        sp = self._namespace(impl)
        dtype = self._compute_dtype(x.values.dtype)
        training = torch.is_grad_enabled()
        subm = set(s) == {1}
        spec = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=pad, dilation=d,
                    bias=bias is not None)
        if subm:
            spec["indice_key"] = "ctssl_subm_" + "_".join(f"{n}{'x'.join(map(str, v))}" for n, v in
                                                          (("k", k), ("p", pad), ("d", d)))
        module = self._module(sp, impl, f"SubMConv{nd}d" if subm else f"SparseConv{nd}d", **spec)
        if list(module.weight_shape) != [cout, *k, cin]:
            raise RuntimeError(f"backend spconv: {impl} expects weights of shape {module.weight_shape}, not the "
                               f"KRSC layout {[cout, *k, cin]} this backend converts to (unsupported spconv version)")
        module.train(training)

        def run(values, w, b):
            params = {"weight": w.to(dtype).permute(0, *range(2, 2 + nd), 1).contiguous()}
            if b is not None:
                params["bias"] = b.to(dtype)
            st = self._sparse(sp, impl, values.to(dtype), x, training)
            out = functional_call(module, params, (st,))
            if subm:
                self._cache(x.index)[("pairs", x.stride, impl, training)].update(out.indice_dict)
                return out.features
            return out.features.index_select(0, self._visible_rows(out, x.index, out_stride))

        y = self._run(run, x.values, weight, bias)
        return PackedTensor(y.to(x.values.dtype) if x.values.dtype == torch.bfloat16 else y, x.index, out_stride,
                            self)

    def _max_pool(self, x, kernel_size, stride, padding):
        nd = x.ndim
        out_stride = check_aligned(f"max_pool{nd}d", x, kernel_size, stride, padding)
        k, s, pad = ntuple(kernel_size, nd), ntuple(stride, nd), ntuple(padding, nd)
        if x.index.num_patches == 0:
            return super()._max_pool(x, kernel_size, stride, padding)
        impl = self._impl_for(x.values.device)
        sp = self._namespace(impl)
        dtype = self._compute_dtype(x.values.dtype)
        module = self._module(sp, impl, f"SparseMaxPool{nd}d", kernel_size=k, stride=s, padding=pad)
        module.train(torch.is_grad_enabled())
        values = x.values.to(dtype)
        # spconv's pool starts from 0 (it returns max(0, max over active pixels)): shift the rows to be
        # non-negative so it returns the true maximum; a zero shift (rows after ReLU) keeps it exact
        shift = values.detach().amin(0).clamp_max(0)

        def run(v, _w, _b):
            out = module(self._sparse(sp, impl, v, x, module.training))
            return out.features.index_select(0, self._visible_rows(out, x.index, out_stride))

        y = self._run(run, values - shift) + shift
        # SparK's masked pixels read 0: a window that holds one cannot have a negative maximum
        touches = self._masked_window(x.index, x.stride, k, s, pad).unsqueeze(1)
        y = torch.where(touches, y.clamp_min(0), y)
        return PackedTensor(y.to(x.values.dtype), x.index, out_stride, self)

    conv2d = conv3d = _conv
    max_pool2d = max_pool3d = _max_pool


def _flat_keys(pixels, spatial) -> torch.Tensor:
    """Row-major flat index over (batch, *spatial) of (b, [z,] y, x) coordinates."""
    key = pixels[0]
    for c, size in zip(pixels[1:], spatial):
        key = key * size + c
    return key
