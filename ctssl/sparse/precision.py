"""The dtype rules every backend follows: which dtype an op computes in, and which it accumulates in.

- Compute: a conv runs in autocast's dtype when autocast is on for the device (as ``F.conv2d``
  does), else in its input's dtype, whose weight must then match (as ``F.conv2d`` requires).
- Accumulation: statistics, reductions and GEMM accumulators are float64 for float64 storage,
  float32 for every narrower dtype (bf16, fp16, fp32).
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """Autocast's dtype when autocast is on for ``device``'s type, else None."""
    dev = torch.device(device).type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4 takes no device type and means CUDA
        enabled = dev == "cuda" and torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(dev)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype()


def compute_dtype(values: torch.Tensor, weight: torch.Tensor, backend: str, op: str = "conv2d") -> torch.dtype:
    """The dtype ``op`` computes in: autocast's, else the input's (a weight of another dtype is refused)."""
    dtype = autocast_dtype(values.device)
    if dtype is not None:
        return dtype
    if weight.dtype != values.dtype:
        raise TypeError(f"backend {backend!r}: {op} input is {values.dtype} but its weight is {weight.dtype}; "
                        "cast the model or run under torch.autocast")
    return values.dtype


__all__ = ["accumulation_dtype", "autocast_dtype", "compute_dtype"]
