"""Loader of ctssl's compiled operators (``ctssl._C`` -> ``torch.ops.ctssl.*``) and their fake impls.

The extension is optional: setup.py builds it only with a CUDA build of torch, nvcc and
``pip install --no-build-isolation``. This module imports it at most once and, when it is
missing or broken, keeps one sentence saying why and how to get it, so that the ``cuda``
backend can fail at selection with that sentence instead of an ImportError deep inside.
Once the operators are verified, the family modules' fake impls are registered
(``torch.library.register_fake``, torch >= 2.4).
"""
from __future__ import annotations

import importlib
import os
import shutil
import warnings
from typing import Callable

import torch

FAMILIES = ("tables", "layout", "conv", "batchnorm", "pool")
"""The op-family modules of this package (one per csrc/ family)."""
REQUIRED_OPS = ("patch_tables", "neighbour_table", "pack_patches", "densify", "halo_gather", "halo_scatter",
                "masked_conv2d", "masked_conv2d_backward", "bn_stats", "bn_apply", "bn_backward_reduce",
                "bn_backward_apply", "max_pool2d", "max_pool2d_backward")
_REBUILD = ("reinstall with `CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=<arch, e.g. 9.0> "
            "pip install --no-build-isolation .` in an environment that has a CUDA build of torch and nvcc")

FAKES: dict[str, Callable] = {}
"""Operator name -> fake impl, filled by the ``@fake`` decorators of the family modules."""
_state: dict[str, object] = {}
_registered: list[str] = []


def ops():
    """``torch.ops.ctssl``: the compiled operators (looked up at call time)."""
    return torch.ops.ctssl


def fake(op: str):
    """Record the decorated function as the fake impl of ``torch.ops.ctssl.<op>``: it allocates exactly
    what the op's entry in csrc/ returns (shape, dtype, device, strides), None for outputs masked off."""
    def record(fn):
        FAKES[op] = fn
        return fn
    return record


def load():
    """The imported ``ctssl._C`` module, or None when it cannot be loaded (see ``missing_reason``)."""
    if "module" not in _state:
        module, reason = None, None
        try:
            module = _import_extension()
        except (ImportError, OSError) as exc:
            reason = _diagnose(exc)
        else:
            missing = [name for name in REQUIRED_OPS if not hasattr(torch.ops.ctssl, name)]
            if missing:
                module, reason = None, (f"ctssl._C loaded but lacks the operators {', '.join(missing)} "
                                        f"(a stale build); {_REBUILD}")
            else:
                _register_fakes()
        _state["module"], _state["reason"] = module, reason
    return _state["module"]


def _import_extension():
    """``ctssl._C``; a checkout's ctssl without its own build uses an installed ctssl's (same version)."""
    try:
        return importlib.import_module("ctssl._C")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ctssl._C", "_C"):
            raise
        import ctssl
        from ctssl import _source_tree

        path = _source_tree.installed_extension(ctssl.__version__)
        if path is None:
            raise
        return _source_tree.load_extension(path)


def missing_reason() -> str | None:
    """None when the compiled operators are usable, else why not and what to do."""
    load()
    return _state["reason"]  # type: ignore[return-value]


def require() -> None:
    """Raise RuntimeError with the reason when the compiled operators are missing."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)


def register_fakes() -> bool:
    """Register every family's fake impls (once); False on torch < 2.4, which has no ``register_fake``.

    Raises if torch refuses one: ``load`` reports it without failing."""
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is None:
        return False
    for family in FAMILIES:
        importlib.import_module(f"{__package__}.{family}")
    for name, impl in FAKES.items():
        if name not in _registered:
            register_fake(f"ctssl::{name}", impl)
            _registered.append(name)
    return True


def _register_fakes() -> None:
    """``register_fakes``; a failure is warned about and kept in ``_state["fake_error"]``, never fatal:
    the eager operators work without fakes."""
    try:
        register_fakes()
    except Exception as exc:  # noqa: BLE001 (any failure: keep the eager operators usable)
        _state["fake_error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"ctssl: fake impls of torch.ops.ctssl.* not registered ({_state['fake_error']}); "
                      "torch.compile and FakeTensor tracing of the cuda backend will fail", RuntimeWarning,
                      stacklevel=3)


def _nvcc_found() -> bool:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return True
    return shutil.which("nvcc") is not None


def _diagnose(exc: BaseException) -> str:
    """Turn an import failure of ctssl._C into the likely cause and the fix."""
    text = str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("ctssl._C", "_C"):
        if torch.version.cuda is None:
            return (f"ctssl's CUDA extension is not built: torch {torch.__version__} is a CPU-only build "
                    f"(setup.py skips the extension then); install a CUDA build of torch and {_REBUILD}")
        if not _nvcc_found():
            return ("ctssl's CUDA extension is not built: no nvcc was found (install the CUDA toolkit and set "
                    f"CUDA_HOME); then {_REBUILD}")
        return ("ctssl's CUDA extension is not built: ctssl was likely installed without --no-build-isolation "
                "(pip's isolated build has no torch, so setup.py skipped the extension) or with CTSSL_NO_CUDA=1; "
                f"{_REBUILD}")
    if "undefined symbol" in text or "version" in text.lower():
        return (f"ctssl._C does not load ({text.strip()}): it was built against another torch or CUDA; {_REBUILD}")
    return f"ctssl._C failed to load ({type(exc).__name__}: {text.strip()}); {_REBUILD}"


__all__ = ["FAKES", "FAMILIES", "REQUIRED_OPS", "fake", "load", "missing_reason", "ops", "register_fakes",
           "require"]
