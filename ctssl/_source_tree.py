"""ctssl imported from a checkout instead of an install: find what the install provides.

setup.py installs ``kernels/`` as ``ctssl.kernels`` and compiles ``csrc/`` into ``ctssl._C``. A
checkout's own ``ctssl/`` has neither, yet ``python -m pytest`` from the checkout's root imports it
ahead of an installed ctssl (after a non-editable ``pip install .``). Without this, the triton and
cuda backends would quietly be unavailable in such a run. So a checkout's ctssl mounts the
checkout's ``kernels/`` as ``ctssl.kernels``, and the cuda loader falls back to the ``ctssl._C`` of
an installed ctssl of the same version (built from these sources by that install).
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def checkout_root() -> str | None:
    """The checkout this ctssl/ belongs to (setup.py and kernels/ beside it), or None for an install."""
    root = os.path.dirname(PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return root
    return None


def mount_kernels(package: ModuleType) -> None:
    """Make the checkout's ``kernels/`` importable as ``ctssl.kernels`` when ctssl/ has no kernels of its own
    (an install has them inside; a development link ``ctssl/kernels -> ../kernels`` is used as it is)."""
    root = checkout_root()
    if root is None or os.path.exists(os.path.join(PACKAGE_DIR, "kernels")) or "ctssl.kernels" in sys.modules:
        return
    kernels = os.path.join(root, "kernels")
    spec = importlib.util.spec_from_file_location("ctssl.kernels", os.path.join(kernels, "__init__.py"),
                                                  submodule_search_locations=[kernels])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ctssl.kernels"] = module
    spec.loader.exec_module(module)
    package.kernels = module


def installed_extension(version: str) -> str | None:
    """The compiled ``ctssl._C`` of an installed ctssl of ``version`` elsewhere on sys.path, or None."""
    if checkout_root() is None:
        return None
    for entry in sys.path:
        directory = os.path.join(os.path.abspath(entry or os.curdir), "ctssl")
        if os.path.abspath(directory) == PACKAGE_DIR or not os.path.isdir(directory):
            continue
        dists = [d for d in importlib.metadata.distributions(path=[entry or os.curdir])
                 if (d.metadata["Name"] or "").lower() == "ctssl"]
        if not any(d.version == version for d in dists):
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            found = sorted(glob.glob(os.path.join(directory, "_C" + suffix)))
            if found:
                return found[0]
    return None


def load_extension(path: str) -> ModuleType:
    """Import the extension file ``path`` as ``ctssl._C``."""
    spec = importlib.util.spec_from_file_location("ctssl._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ctssl._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("ctssl._C", None)
        raise
    sys.modules["ctssl"]._C = module
    return module
