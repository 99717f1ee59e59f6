"""What every kernel wrapper shares: the interpreter switch, launch configs and input checks.

Triton's interpreter (``TRITON_INTERPRET=1``, read when the ``@triton.jit``
decorators run) executes kernels on CPU tensors with numpy. It cannot autotune
(benchmarking needs a device), its cost is per program instance, and it gets
bf16 arithmetic wrong; so under it every kernel runs one large-block config.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when the kernels were compiled for Triton's CPU interpreter (fixed at import)."""

if INTERPRET:
    # The interpreter checks every int32 add/mul for overflow by redoing it in int64,
    # which doubles the cost of index arithmetic; the wrappers bound every index
    # (int64 where a product can exceed int32), so the tests run with the check off.
    try:
        import dataclasses

        from triton.runtime import interpreter as _interp

        _interp.interpreter_builder.options = dataclasses.replace(_interp.interpreter_builder.options,
                                                                  sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another triton layout: keep its default
        pass

BACKEND = "triton"
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

GPU_STATS_BLOCK_M = 128
STATS_BLOCK_M = 512 if INTERPRET else GPU_STATS_BLOCK_M
"""Rows per BatchNorm statistics block, shared by the conv epilogue and the BN kernels
(larger under the interpreter, whose cost is per program)."""


class TunedKernel:
    """A jit kernel plus the configs it is autotuned over on a GPU.

    ``fixed`` is the config used where autotuning must not run: under the
    interpreter (``interp`` then) and in deterministic mode, where a config chosen
    by timing could differ between processes and change the summation order.
    """

    def __init__(self, kernel, configs: list[triton.Config], key: list[str], fixed: triton.Config,
                 interp: triton.Config | None = None, reset_to_zero: list[str] | None = None, prune=None):
        self.kernel = kernel
        self.configs, self.prune = list(configs), prune  # kept for the ahead-of-time resource check
        self.fixed = (interp or fixed) if INTERPRET else fixed
        self.tuned = None
        if not INTERPRET and len(configs) > 1:
            kw = dict(configs=configs, key=key, reset_to_zero=reset_to_zero)
            if prune is not None:
                kw["prune_configs_by"] = {"early_config_prune": prune}
            try:  # short benchmarks: a ResNet has dozens of distinct shapes to tune once each
                self.tuned = triton.autotune(**kw, do_bench=_quick_bench)(kernel)
            except TypeError:  # triton without the do_bench argument
                self.tuned = triton.autotune(**kw)(kernel)

    def meta(self, interp: dict | None = None) -> dict:
        """Block sizes of the fixed config, with the interpreter overrides applied (for sizing buffers)."""
        out = dict(self.fixed.kwargs)
        if INTERPRET and interp:
            out.update(interp)
        return out

    def launch(self, grid, *args, tune: bool = True, interp: dict | None = None, **kwargs) -> None:
        """Run on ``grid`` (a function of the meta-parameters); ``interp`` overrides blocks under the interpreter."""
        if self.tuned is not None and tune:
            self.tuned[grid](*args, **kwargs)
            return
        kwargs.update(self.fixed.kwargs)
        if INTERPRET and interp:
            kwargs.update(interp)
        if not INTERPRET:
            kwargs.update(num_warps=self.fixed.num_warps, num_stages=self.fixed.num_stages)
        self.kernel[grid](*args, **kwargs)


def _quick_bench(fn, quantiles=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def config(num_warps: int = 4, num_stages: int = 2, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def check_tensor(name: str, t: torch.Tensor, *, device: torch.device | None = None, dtypes=STORAGE_DTYPES,
                 dim: int | None = None, contiguous: bool = True) -> None:
    """Raise a ValueError/TypeError naming ``name`` when ``t`` cannot be passed to a kernel."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{BACKEND}: {name} must be a tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{BACKEND}: {name} has dtype {t.dtype}; the Triton kernels take {allowed}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{BACKEND}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{BACKEND}: {name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{BACKEND}: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    check_kernel_device(name, t.device)


def check_kernel_device(name: str, device: torch.device) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if device.type == "cuda":
        if INTERPRET:
            raise ValueError(f"{BACKEND}: {name} is on {device}, but the kernels were compiled for the CPU "
                             "interpreter (TRITON_INTERPRET=1 was set at import)")
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise ValueError(f"{BACKEND}: {name} is on {device}; the Triton kernels need a CUDA tensor "
                     "(CPU tensors only under TRITON_INTERPRET=1, set before import)")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: tf32 for fp32 only when torch allows it for matmuls."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_splits(M: int, tiles: int, device: torch.device, granule: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for a reduction over ``M`` rows done by ``tiles`` programs per split:
    enough splits to give the GPU about two programs per SM, each split a multiple of ``granule`` rows
    (a multiple of every BLOCK_M the kernel may run with) and at least two granules long."""
    row_chunks = triton.cdiv(M, granule * 2)
    splits = max(1, min(row_chunks, triton.cdiv(2 * num_sms(device), tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), granule) * granule
    return triton.cdiv(M, rows_per_split), rows_per_split


def interp_block(n: int, lo: int = 16, hi: int = 256) -> int:
    """Under the interpreter, a block that covers ``n`` in one step (a power of two in [lo, hi])."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def size_key(n: int) -> int:
    """A coarse size for autotune keys: the bit length, so a key changes only when n doubles."""
    return int(n).bit_length()
