"""Backend registry: one engine API, implementations selected by name.

Backends are imported lazily, so a missing optional dependency (triton, the CUDA
extension, spconv, MinkowskiEngine) only matters when that backend is asked for,
and then fails at selection with a message that says why and what to install.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .base import Backend

if TYPE_CHECKING:
    from .. import speed_rank

_REGISTRY: dict[str, tuple[str, str]] = {
    "dense": ("ctssl.sparse.backends.dense", "DenseBackend"),
    "torch": ("ctssl.sparse.backends.torch_packed", "TorchBackend"),
    "triton": ("ctssl.sparse.backends.triton", "TritonBackend"),
    "cuda": ("ctssl.sparse.backends.cuda", "CudaBackend"),
    "spconv": ("ctssl.sparse.backends.spconv", "SpconvBackend"),
    "minkowski": ("ctssl.sparse.backends.minkowski", "MinkowskiBackend"),
}
_NEEDS: dict[str, str] = {
    "triton": "a GPU and the triton package (or TRITON_INTERPRET=1 set before import for CPU tests)",
    "cuda": "a GPU and ctssl's CUDA extension, built by `pip install --no-build-isolation .` with nvcc "
            "and a CUDA build of torch",
    "spconv": ("spconv 2.x: `pip install spconv-cu126` (GPU) or `pip install spconv==2.3.8 cumm==0.7.11` "
               "(CPU, forward only)"),
    "minkowski": "MinkowskiEngine 0.5.4, which has no wheels: build it from source (the reason above says how)",
}
AUTO_ORDER_GPU = ("triton", "cuda", "torch", "spconv")
"""``auto``'s candidates on a CUDA device, in the order it uses when nothing has been measured."""
AUTO_ORDER_CPU = ("torch",)
"""``auto``'s candidates on the CPU: one, so nothing is measured there."""
_instances: dict[str, Backend] = {}
_warned: set[tuple[str, str, str]] = set()  # (failure, backend, device) reported once: "self-check" or "timing"


class BackendUnavailableError(ValueError):
    """The named backend does not exist or cannot run here."""


def register_backend(name: str, module: str, cls: str, needs: str = "") -> None:
    """Add a backend implemented by ``module.cls`` (imported on first use)."""
    _REGISTRY[name] = (module, cls)
    if needs:
        _NEEDS[name] = needs
    _instances.pop(name, None)


def _load(name: str) -> tuple[Backend | None, str | None]:
    if name in _instances:
        return _instances[name], None
    module, cls = _REGISTRY[name]
    try:
        backend = getattr(importlib.import_module(module), cls)()
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            return None, "not implemented in this version of ctssl"
        return None, f"import failed ({exc})"
    except (ImportError, RuntimeError, OSError) as exc:
        return None, f"import failed ({exc})"
    reason = backend.unavailable_reason()
    if reason:
        return None, reason
    _instances[name] = backend
    return backend, None


def backend_status() -> dict[str, str | None]:
    """Every registered backend name -> None if usable here, else the reason."""
    return {name: _load(name)[1] for name in _REGISTRY}


def available_backends() -> list[str]:
    return [name for name, reason in backend_status().items() if reason is None]


def get_backend(name: str | Backend = "dense", device: torch.device | str | None = None, *,
                training: bool = False, ops=None, model: str = "this model") -> Backend:
    """The backend called ``name`` (``auto`` picks the fastest usable one for ``device``).

    Fails here, not deep inside a forward, when the name is unknown or the backend
    cannot run (with ``training``: cannot run the backward) on ``device``: the message
    lists what is usable and what the missing one needs. ``ops`` (names from ``base.OPS``,
    e.g. an encoder's ``sparse_ops``) are the ops ``model`` needs: ``auto`` only picks a
    backend that has them, a named backend without them is refused with its reason.
    """
    backend = _select(name, device, ops)
    if training and device is not None:
        reason = backend.training_unsupported_reason(torch.device(device))
        if reason:
            raise BackendUnavailableError(f"backend {backend.name!r} cannot train on {torch.device(device)}: {reason}")
    if ops is not None:
        backend.check_ops(ops, model)
    return backend


@dataclass
class AutoPick:
    """What ``auto`` picks on a device and why (``ctssl-backends`` prints ``reason()``)."""

    backend: Backend
    device: str
    """The device's name (``ctssl.sparse.device_cache.device_name``)."""
    candidates: tuple[str, ...]
    """The backends ``auto`` chose among (usable, with the ops, self-check not failed), in listed order."""
    ranking: speed_rank.Ranking | None = None
    """Their measured step times; None when nothing was measured (one candidate, or ``check=False`` and none
    cached)."""
    failed_checks: tuple = ()
    """The ``self_check.Verdict`` of each backend skipped for a failed self-check."""

    def reason(self) -> str:
        """Why ``backend``: e.g. ``measured on NVIDIA H200: triton 1.23 ms, cuda 1.41 ms, torch 2.80 ms``."""
        skipped = [f"{v.backend} failed its self-check" for v in self.failed_checks]
        if self.ranking is not None:
            skipped += [f"{name} failed while timed ({error})" for name, error in self.ranking.errors.items()]
        if not self.candidates:
            why = f"none of auto's candidates can run here: {self.backend.name}, the fallback"
        elif len(self.candidates) == 1:
            why = f"nothing measured: {self.candidates[0]} is the only backend auto can use on this device"
        elif self.ranking is None:
            why = (f"not measured yet: the first of {', '.join(self.candidates)} as listed "
                   f"(`ctssl-backends --check` measures them)")
        elif not self.ranking.times_ms:
            why = f"every candidate failed while timed on {self.device}"
        else:
            why = f"measured on {self.device}: {self.ranking.summary()}"
        return why + "".join(f"; {s}" for s in skipped)

    def as_dict(self) -> dict:
        """The pick as plain data (e.g. for a benchmark's JSON record)."""
        return {"backend": self.backend.name, "device": self.device, "candidates": list(self.candidates),
                "ranking": None if self.ranking is None else asdict(self.ranking),
                "failed_checks": [asdict(v) for v in self.failed_checks], "reason": self.reason()}


def auto_backend(device: torch.device | str | None = None, *, check: bool = True, ops=None) -> Backend:
    """What ``auto`` picks for ``device``: the usable backend with ``ops`` that ran a representative masked
    step fastest on this device.

    The candidates are ``AUTO_ORDER_GPU`` on a CUDA device, ``AUTO_ORDER_CPU`` elsewhere, less those that
    are not usable, cannot train there or lack ``ops``. A backend with custom kernels
    (``self_check_before_auto``) must first pass its self-check on the device (run once, then cached:
    ``ctssl.sparse.self_check``); one that fails is skipped with one warning naming the failure. When more
    than one candidate remains, each is timed once on the device and the ranking cached
    (``ctssl.sparse.speed_rank``): per device, per ops family (ConvNeXt's ops or not), measured on a 2-D
    workload (3-D SparK keeps its own fallback, ``ctssl.ssl.spark.SparK.engine``); a candidate that raises
    while timed is skipped with one warning. A single candidate (the CPU) is never timed. ``check=False``
    runs no check and no timing: a cached failure still skips, a cached ranking still orders, else the
    listed order decides. ``torch`` when no candidate is left.
    """
    return _auto(device, check, ops, fresh=False, stacklevel=5).backend


def explain_auto(device: torch.device | str | None = None, *, check: bool = True, ops=None,
                 fresh: bool = False) -> AutoPick:
    """``auto_backend``'s pick with the candidates, the measured times and the reason; ``fresh`` times the
    candidates again even when a ranking is cached (``ctssl-backends --check``)."""
    return _auto(device, check, ops, fresh=fresh, stacklevel=3)


def _usable_for_training(backend: Backend, device: torch.device) -> bool:
    try:
        backend.check_device(device)
    except ValueError:  # BackendUnavailableError too: it does not run on this device
        return False
    return backend.training_unsupported_reason(device) is None


def _auto(device, check: bool, ops, fresh: bool, stacklevel: int) -> AutoPick:
    from .. import self_check, speed_rank
    from ..device_cache import device_name

    dev = torch.device(device) if device is not None else torch.device("cpu")
    failed, candidates = [], []
    for name in AUTO_ORDER_GPU if dev.type == "cuda" else AUTO_ORDER_CPU:
        backend, _ = _load(name)
        if backend is None or (ops is not None and not set(ops) <= backend.supported_ops):
            continue
        if not _usable_for_training(backend, dev):
            continue
        if backend.self_check_before_auto:
            verdict = self_check.check(backend, dev) if check else self_check.cached_verdict(backend, dev)
            if verdict is not None and not verdict.ok:
                failed.append(verdict)
                continue
        candidates.append(backend)
    names = [b.name for b in candidates]
    ranking = None
    if len(candidates) > 1:
        ranking = (speed_rank.rank(candidates, dev, ops, fresh=fresh) if check
                   else speed_rank.cached_ranking(names, dev, ops))
    chosen = None
    if ranking is not None:
        fastest = ranking.fastest(names)
        chosen = next((b for b in candidates if b.name == fastest), None)
    if chosen is None:
        errors = ranking.errors if ranking is not None else {}
        chosen = next((b for b in candidates if b.name not in errors), None) or _select("torch", None)
    pick = AutoPick(chosen, device_name(dev), tuple(names), ranking, tuple(failed))
    for verdict in failed:
        if ("self-check", verdict.backend, verdict.device) not in _warned:
            _warned.add(("self-check", verdict.backend, verdict.device))
            warnings.warn(f"ctssl: backend {verdict.backend!r} failed its self-check on {verdict.device} "
                          f"({verdict.error}); `auto` uses {chosen.name!r} instead (`ctssl-backends --check` "
                          f"runs the checks again; verdicts are cached in {self_check.cache_dir()})",
                          RuntimeWarning, stacklevel=stacklevel)
    for name, error in (ranking.errors if ranking is not None else {}).items():
        if ("timing", name, ranking.device) not in _warned:
            _warned.add(("timing", name, ranking.device))
            warnings.warn(f"ctssl: backend {name!r} failed while `auto` timed it on {ranking.device} ({error}); "
                          f"`auto` uses {chosen.name!r} instead (`ctssl-backends --check` times the backends "
                          f"again; times are cached in {speed_rank.cache_dir()})", RuntimeWarning,
                          stacklevel=stacklevel)
    return pick


def _select(name: str | Backend, device, ops=None) -> Backend:
    if isinstance(name, Backend):
        if device is not None:
            name.check_device(torch.device(device))
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    if name == "auto":
        return auto_backend(device, ops=ops)
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of {', '.join(['auto', *_REGISTRY])} "
            f"(usable here: {', '.join(available_backends())})"
        )
    backend, reason = _load(name)
    if backend is None:
        need = _NEEDS.get(name, "")
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {reason}. It needs {need}. "
            f"Usable here: {', '.join(available_backends())}"
        )
    if device is not None:
        backend.check_device(torch.device(device))
    return backend


__all__ = [
    "Backend", "BackendUnavailableError", "auto_backend", "available_backends", "backend_status", "get_backend",
    "register_backend", "explain_auto", "AutoPick", "AUTO_ORDER_GPU", "AUTO_ORDER_CPU",
]
