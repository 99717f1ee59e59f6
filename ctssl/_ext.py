"""Loader of ctssl's compiled operators (``ctssl._C`` -> ``torch.ops.ctssl.*``).

The extension is optional: setup.py builds it only with a CUDA build of torch, nvcc and
``pip install --no-build-isolation``. This module imports it at most once and, when it is
missing or broken, keeps one sentence saying why and how to get it, so that the ``cuda``
backend can fail at selection with that sentence instead of an ImportError deep inside.
"""
from __future__ import annotations

import importlib
import os
import shutil
import warnings

import torch

_REQUIRED_OPS = ("patch_tables", "pack_patches", "densify", "halo_gather", "halo_scatter", "masked_conv2d",
                 "masked_conv2d_backward", "bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply",
                 "max_pool2d", "max_pool2d_backward")
_REBUILD = ("reinstall with `CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=<arch, e.g. 9.0> "
            "pip install --no-build-isolation .` in an environment that has a CUDA build of torch and nvcc")

_state: dict[str, object] = {}


def load():
    """The imported ``ctssl._C`` module, or None when it cannot be loaded (see ``missing_reason``)."""
    if "module" not in _state:
        module, reason = None, None
        try:
            module = importlib.import_module("ctssl._C")
        except (ImportError, OSError) as exc:
            reason = _diagnose(exc)
        else:
            missing = [name for name in _REQUIRED_OPS if not hasattr(torch.ops.ctssl, name)]
            if missing:
                module, reason = None, (f"ctssl._C loaded but lacks the operators {', '.join(missing)} "
                                        f"(a stale build); {_REBUILD}")
            else:
                _register_fakes()
        _state["module"], _state["reason"] = module, reason
    return _state["module"]


def missing_reason() -> str | None:
    """None when the compiled operators are usable, else why not and what to do."""
    load()
    return _state["reason"]  # type: ignore[return-value]


def require() -> None:
    """Raise RuntimeError with the reason when the compiled operators are missing."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)


def _register_fakes() -> None:
    """Fake impls for FakeTensor / torch.compile (ctssl._fake_ops); a failure there is warned about and
    kept in ``_state["fake_error"]``, never fatal: the eager operators work without them."""
    try:
        from . import _fake_ops
        _fake_ops.register()
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


__all__ = ["load", "missing_reason", "require"]
