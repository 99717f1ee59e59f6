"""What the benchmark suites measure on this machine: sizes, dtypes, backends.

Two profiles, chosen by the device: on a CUDA GPU the real workload (batch 128,
224 px, ResNet-50, bf16 autocast, channels-last); on a CPU small shapes so the
whole folder runs in minutes on two cores. Environment variables override the
choice (``CTSSL_BENCH_DEVICE=cpu|cuda``, ``CTSSL_BENCH_ENCODER``,
``CTSSL_BENCH_BATCH``, ``CTSSL_BENCH_SIZE``, ``CTSSL_BENCH_THREADS``).

Backends come from the engine's registry, so a new backend appears here without
an edit; two baselines are added: ``dense-nomask`` (the plain dense op or model on
unmasked input: cuDNN on a GPU) and ``dense`` (SparK's emulation).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import pytest
import torch

from ctssl.sparse import backend_status, get_backend
from ctssl.sparse.backends import Backend, BackendUnavailableError

NOMASK = "dense-nomask"
"""The plain dense baseline: the same op/model on unmasked input, no mask anywhere."""
EMULATION = "dense"
"""SparK's emulation (dense op, then multiply by the mask; gather-scatter BN)."""

# backends whose CPU path is an emulator or lacks a mode: timed on a GPU only
CPU_NOT_TIMED = {
    "triton": "triton on a CPU runs in Triton's interpreter (TRITON_INTERPRET=1), a correctness tool "
              "whose timings mean nothing; benchmark it on a GPU",
}
CPU_NO_BACKWARD = {
    "spconv": "spconv's CPU build runs forward only (its backward needs CUDA)",
}


@dataclass(frozen=True)
class Profile:
    """Shapes, precisions and repetition counts for one kind of machine."""

    name: str
    device: torch.device
    op_batch: int
    op_size: int
    op_dtypes: tuple[torch.dtype, ...]
    model_batch: int
    model_size: int
    encoder: str
    amp_dtype: torch.dtype | None  # autocast dtype for model benchmarks (None: full precision)
    channels_last: bool
    mask_ratios: tuple[float, ...]
    model_mask_ratios: tuple[float, ...]
    spark_mask_ratios: tuple[float, ...]
    decoder_width: int
    rounds: int
    model_rounds: int
    warmup_rounds: int
    rotate: int  # input sets cycled through, so repeated runs do not just re-read the cache
    threads: int | None = None  # torch CPU threads while timing (None: leave torch's setting)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return f"{_dtype_name(self.amp_dtype)}-autocast" if self.amp_dtype is not None else "float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected a positive integer")
    return value


def select_device() -> torch.device:
    wanted = os.environ.get("CTSSL_BENCH_DEVICE", "").strip().lower()
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"CTSSL_BENCH_DEVICE={wanted!r}: expected 'cpu' or 'cuda'")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("CTSSL_BENCH_DEVICE=cuda but torch sees no CUDA GPU")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def make_profile() -> Profile:
    device = select_device()
    if device.type == "cuda":
        size = _env_int("CTSSL_BENCH_SIZE", 224)
        batch = _env_int("CTSSL_BENCH_BATCH", 128)
        profile = Profile(
            name="gpu", device=device, op_batch=batch, op_size=size,
            op_dtypes=(torch.bfloat16, torch.float32),
            model_batch=batch, model_size=size, encoder=os.environ.get("CTSSL_BENCH_ENCODER", "resnet50"),
            amp_dtype=torch.bfloat16, channels_last=True,
            mask_ratios=(0.3, 0.6, 0.9), model_mask_ratios=(0.3, 0.6, 0.9), spark_mask_ratios=(0.3, 0.6, 0.9),
            decoder_width=768, rounds=20, model_rounds=10, warmup_rounds=3, rotate=3,
            notes=("GPU profile: float32 op cases use torch's defaults (cuDNN may use TF32 for convolutions)",),
        )
    else:
        # 64 px = a 2x2 patch grid: mask ratios 0.25 / 0.5 / 0.75 keep 3 / 2 / 1 patches per image
        size = _env_int("CTSSL_BENCH_SIZE", 64)
        batch = _env_int("CTSSL_BENCH_BATCH", 2)
        profile = Profile(
            name="cpu", device=device, op_batch=batch, op_size=size, op_dtypes=(torch.float32,),
            model_batch=batch, model_size=size, encoder=os.environ.get("CTSSL_BENCH_ENCODER", "resnet18"),
            amp_dtype=None, channels_last=False,
            mask_ratios=(0.25, 0.5, 0.75), model_mask_ratios=(0.25, 0.5, 0.75), spark_mask_ratios=(0.5,),
            decoder_width=192, rounds=5, model_rounds=3, warmup_rounds=0, rotate=1,
            threads=_env_int("CTSSL_BENCH_THREADS", 1),
            notes=("CPU development profile: small shapes, float32, ResNet-18 encoder and a SparK decoder of "
                   "width 192 so the suite runs in minutes on 2 cores; not the product's GPU workload",
                   "memory: CPU runs record saved_activation_bytes (what autograd keeps for backward); "
                   "peak allocator memory is measured on CUDA only (tracemalloc does not see torch's allocator)",
                   "timed with 1 torch thread by default (CTSSL_BENCH_THREADS): on a shared 2-core machine "
                   "two-thread timings were dominated by scheduling stalls"),
        )
    if profile.op_size % 32 or profile.model_size % 32:
        raise ValueError(f"CTSSL_BENCH_SIZE must be a multiple of 32 (the patch size), got {profile.op_size}")
    return profile


PROFILE = make_profile()


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's with its core count (recorded beside every figure)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, CPU)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda)}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure just means "not here"
        out["triton"] = f"not importable ({type(exc).__name__})"
    return out


_STATUS: dict[str, str | None] | None = None


def registry_status() -> dict[str, str | None]:
    """``backend_status()`` once per process (it imports every backend)."""
    global _STATUS
    if _STATUS is None:
        _STATUS = backend_status()
    return _STATUS


def backend_names() -> list[str]:
    """Every name the suites parametrize over: the two baselines, then the registry's order."""
    return [NOMASK, EMULATION] + [n for n in registry_status() if n != EMULATION]


def require_backend(name: str, profile: Profile = PROFILE, *, backward: bool = False, ops=None) -> Backend | None:
    """The backend to time, or ``pytest.skip`` with the registry's reason (or the reason it lacks one of
    ``ops``, names from ``ctssl.sparse.backends.base.OPS``). None for ``dense-nomask``."""
    if name == NOMASK:
        return None
    reason = registry_status().get(name, f"{name!r} is not a registered backend")
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if profile.device.type == "cpu" and name in CPU_NOT_TIMED:
        pytest.skip(f"backend {name!r}: {CPU_NOT_TIMED[name]}")
    if profile.device.type == "cpu" and backward and name in CPU_NO_BACKWARD:
        pytest.skip(f"backend {name!r}: {CPU_NO_BACKWARD[name]}")
    try:
        backend = get_backend(name, profile.device)
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} cannot run on {profile.device}: {exc}")
    try:
        if ops is not None:
            backend.check_ops(ops, "this case")
    except ValueError as exc:
        pytest.skip(str(exc))
    return backend


def backend_mask_params(ratios: tuple[float, ...]) -> list:
    """(backend, mask_ratio) pairs: the no-mask baseline once, every masked backend at every ratio."""
    params = [pytest.param(NOMASK, None, id=NOMASK)]
    for name in backend_names()[1:]:
        params += [pytest.param(name, r, id=f"{name}-m{r}") for r in ratios]
    return params


def dtype_params(dtypes: tuple[torch.dtype, ...]) -> list:
    return [pytest.param(d, id=_dtype_name(d)) for d in dtypes]


def dtype_name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else _dtype_name(dtype)
