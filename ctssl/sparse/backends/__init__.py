"""Backend registry: one engine API, implementations selected by name.

Backends are imported lazily, so a missing optional dependency (triton, the CUDA
extension, spconv, MinkowskiEngine) only matters when that backend is asked for,
and then fails at selection with a message that says why and what to install.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from .base import Backend

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
AUTO_ORDER_GPU = ("triton", "cuda", "torch")
AUTO_ORDER_CPU = ("torch",)
_instances: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()  # (backend, device) whose failed self-check was reported


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


def auto_backend(device: torch.device | str | None = None, *, check: bool = True, ops=None) -> Backend:
    """What ``auto`` picks for ``device``: the first usable backend of ``AUTO_ORDER_GPU`` on a CUDA
    device, of ``AUTO_ORDER_CPU`` elsewhere (``torch`` when none is), among those with ``ops``.

    A backend with custom kernels (``self_check_before_auto``) must first pass its self-check on the
    device (run once, then cached: ``ctssl.sparse.self_check``); one that fails is skipped with one
    warning naming the failure. ``check=False`` runs no check (a cached failure still skips).
    """
    from .. import self_check

    dev = torch.device(device) if device is not None else torch.device("cpu")
    failed = []
    chosen = None
    for candidate in AUTO_ORDER_GPU if dev.type == "cuda" else AUTO_ORDER_CPU:
        backend, _ = _load(candidate)
        if backend is None or (ops is not None and not set(ops) <= backend.supported_ops):
            continue
        if backend.self_check_before_auto:
            verdict = self_check.check(backend, dev) if check else self_check.cached_verdict(backend, dev)
            if verdict is not None and not verdict.ok:
                failed.append(verdict)
                continue
        chosen = backend
        break
    if chosen is None:
        chosen = _select("torch", None)
    for verdict in failed:
        if (verdict.backend, verdict.device) not in _warned:
            _warned.add((verdict.backend, verdict.device))
            warnings.warn(f"ctssl: backend {verdict.backend!r} failed its self-check on {verdict.device} "
                          f"({verdict.error}); `auto` uses {chosen.name!r} instead (`ctssl-backends --check` "
                          f"runs the checks again; verdicts are cached in {self_check.cache_dir()})",
                          RuntimeWarning, stacklevel=4)
    return chosen


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
    "register_backend", "AUTO_ORDER_GPU", "AUTO_ORDER_CPU",
]
