"""The ``cuda`` backend: the packed layout on ctssl's compiled operators (``ctssl.cuda_ops``, csrc/).

A thin adapter, like ``triton`` over ``ctssl.kernels``: it checks devices, looks up the per-batch
tables and calls the operators' autograd Functions:
- layout: ``pack_patches`` / ``densify``;
- conv: halo gather + cuDNN conv (k > 1), cuBLAS GEMM on the rows (1x1); non-square geometry
  falls back to the ``torch`` backend's path. The halo reads the neighbour table of radius
  ``ceil(padding / patch_side)``, so ConvNeXt's depthwise 7x7 conv (groups = channels) is the same
  op on the radius-2 (stride 16) or radius-3 (stride 32) table: cuDNN's grouped conv on the halo;
- BatchNorm: statistics now (``ctssl.sparse.norm_stats``), apply pending (``ctssl.sparse.pending``),
  so ``relu(bn(x) + identity)`` in a ResNet block runs as one apply kernel, forward and backward;
- max pool: masked taps read 0, taps beyond the image are skipped (-inf padding);
- LayerNorm: ATen's ``native_layer_norm`` on the rows (fp32 statistics), see ``layer_norm``.
Average pooling, per-image scaling and ConvNeXt's per-row ops (Linear, GELU, layer scale) are inherited
from the ``torch`` backend: on rows each is one framework op (a cuBLAS GEMM, an elementwise kernel).
The backend runs on CUDA tensors only (the CPU tests run the same Functions on the operators' CPU loops).
"""
from __future__ import annotations

import torch

from ...cuda_ops import runtime
from ...cuda_ops.batchnorm import apply_row_batch_norm, batch_norm_stats
from ...cuda_ops.conv import MaskedConv2d
from ...cuda_ops.layout import Densify, PackPatches
from ...cuda_ops.pool import MaskedMaxPool2d
from ...cuda_ops.tables import PatchTables, neighbour_table, patch_tables
from ..index import PatchIndex, neighbour_radius
from ..pending import PendingBatchNorm, PendingBN
from ..precision import compute_dtype
from ..tensor import PackedTensor, SparseTensor
from .base import CONVNEXT_OPS, Backend, check_aligned, pair
from .torch_packed import TorchBackend


class CudaBackend(TorchBackend):
    """Packed layout on ctssl's CUDA kernels; needs the compiled extension and a GPU."""

    name = "cuda"
    spatial_dims = (2,)  # the operators in csrc/ index 2-D patch grids only
    pending_activations = frozenset({"relu", "relu6"})
    self_check_before_auto = True
    needs = ("a CUDA GPU and ctssl's CUDA extension, built by `pip install --no-build-isolation .` "
             "with nvcc and a CUDA build of torch")
    supported_ops = Backend.supported_ops | {"instance_norm"} | CONVNEXT_OPS  # instance_norm: the torch backend's

    def unavailable_reason(self) -> str | None:
        reason = runtime.missing_reason()
        if reason:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False); use backend 'torch' on the CPU"
        return None

    def check_device(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors only, got a tensor on {device}; "
                             f"use backend='torch' for CPU tensors")

    def _tables(self, x_or_index) -> PatchTables:
        index = x_or_index.index if isinstance(x_or_index, SparseTensor) else x_or_index
        self.check_device(index.device)
        return patch_tables(index)

    # --- layout ------------------------------------------------------------------------------
    def sparse_input(self, images: torch.Tensor, index: PatchIndex) -> SparseTensor:
        self.check_device(images.device)
        t = self._tables(index)
        rows = PackPatches.apply(images, t.patch_ids, t.slot, index.h, index.w)
        return PackedTensor(rows, index, 1, self)

    def to_dense(self, x: SparseTensor) -> torch.Tensor:
        t = self._tables(x)
        return Densify.apply(x.values.contiguous(), None, t.slot, t.patch_ids, x.patch_side,
                             x.index.dense_mask(x.stride))

    def densify(self, x: SparseTensor, token: torch.Tensor) -> torch.Tensor:
        t = self._tables(x)
        token = token.reshape(-1).to(x.values.dtype).contiguous()
        if token.numel() != x.channels:
            raise ValueError(f"densify: token has {token.numel()} values for {x.channels} channels")
        return Densify.apply(x.values.contiguous(), token, t.slot, t.patch_ids, x.patch_side,
                             x.index.dense_mask(x.stride))

    # --- ops ---------------------------------------------------------------------------------
    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        out_stride = check_aligned("conv2d", x, weight.shape[-2:], stride, padding, dilation)
        (s, _), (ph, pw), (d, dw) = pair(stride), pair(padding), pair(dilation)
        if ph != pw or d != dw or weight.shape[-1] != weight.shape[-2]:
            return super().conv2d(x, weight, bias, stride, padding, dilation, groups)  # non-square: torch path
        self.check_device(x.values.device)
        nbr = neighbour_table(x.index, neighbour_radius(x.patch_side, ph))
        dtype = compute_dtype(x.values, weight, self.name)
        rows = x.values.to(dtype).contiguous()
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        y = MaskedConv2d.apply(rows, w, b, nbr, x.patch_side, s, ph, d, groups)
        return PackedTensor(y, x.index, out_stride, self)

    def batch_norm(self, x, weight, bias, running_mean, running_var, training, momentum, eps, process_group=None):
        """Statistics now (running ones updated), the apply pass pending: ``relu``/``relu6``/``add``
        on the result fold into it, so a ResNet block's ``relu(bn(x) + identity)`` is one kernel."""
        self.check_device(x.values.device)
        rows = x.values.contiguous()
        stats = batch_norm_stats(rows, running_mean, running_var, training, momentum, eps, process_group)
        if stats is None:  # nothing visible: like batch_norm_rows, the input
            return x
        return PendingBatchNorm(PendingBN(rows, stats, weight, bias), x.index, x.stride, self)

    def apply_pending(self, p: PendingBN, activation: str | None) -> torch.Tensor:
        return apply_row_batch_norm(p.x1, p.weight1, p.bias1, p.stats1, activation, p.res)

    def layer_norm(self, x, weight, bias, eps):
        """ConvNeXt's LayerNorm2d is a LayerNorm over the channels of each row: ATen's ``native_layer_norm`` on
        the contiguous rows (fp32 statistics for fp16/bf16 storage; its own backward, fakes and autocast rule)."""
        self.check_device(x.values.device)
        return x.with_values(torch.nn.functional.layer_norm(x.values.contiguous(), (x.channels,), weight, bias, eps))

    def max_pool2d(self, x, kernel_size, stride, padding):
        out_stride = check_aligned("max_pool2d", x, kernel_size, stride, padding)
        (k, kw), (s, _), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
        if k != kw or ph != pw:
            return super().max_pool2d(x, kernel_size, stride, padding)
        t = self._tables(x)
        y = MaskedMaxPool2d.apply(x.values.contiguous(), t.neighbours, x.patch_side, k, s, ph)
        return PackedTensor(y, x.index, out_stride, self)


__all__ = ["CudaBackend"]
