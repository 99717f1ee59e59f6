"""Results measured once per device and kept on disk: the one rule for what makes them stale.

A self-check verdict (``self_check``) and a backend speed ranking (``speed_rank``) hold for one
device and one build of the code. Each is stored as ``$XDG_CACHE_HOME/ctssl/<kind>/<label>-<hash>.json``
(default ``~/.cache/ctssl``) holding ``{"key": ..., ...}``; the key names the device, the ctssl,
torch, CUDA and triton versions and a fingerprint of ctssl's files, so a new card, a new driver stack
or a changed kernel is measured again. Files are written atomically; an unwritable cache is only not kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import write_json


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ctssl`` (``~/.cache/ctssl`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ctssl"


def cache_dir(kind: str) -> Path:
    """Where results of ``kind`` ("self-check", "speed-rank") are kept."""
    return cache_root() / kind


def device_name(device: torch.device | str) -> str:
    """The device as results are keyed: the card's name on CUDA, the machine's architecture elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine() or 'unknown'})"


def versions() -> dict:
    """The versions a result depends on, and ``files``: the fingerprint of ctssl's sources and kernels."""
    import ctssl

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"ctssl": ctssl.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "files": fingerprint()}


def fingerprint() -> str:
    """Size and modification time of ctssl's sources and compiled extension: a changed kernel is measured again."""
    import ctssl

    roots = [Path(ctssl.__file__).parent]
    kernels = getattr(ctssl, "kernels", None)
    if kernels is not None and getattr(kernels, "__file__", None):
        roots.append(Path(kernels.__file__).parent)
    digest = hashlib.sha1()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".so", ".pyd") and path.is_file():
                st = path.stat()
                digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def key(device: torch.device | str, **fields) -> dict:
    """The full key of a result about ``device``: ``fields`` (what was measured), the device name, ``versions()``."""
    return {**fields, "device": device_name(device), **versions()}


def path(kind: str, label: str, key: dict) -> Path:
    """The file of the result with ``key``: ``<kind>/<label>-<hash of key>.json``."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir(kind) / f"{label}-{digest}.json"


def load(kind: str, label: str, key: dict) -> dict | None:
    """The stored document with exactly ``key`` (without its ``key`` entry), or None."""
    try:
        stored = json.loads(path(kind, label, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return {k: v for k, v in stored.items() if k != "key"}


def store(kind: str, label: str, key: dict, doc: dict) -> None:
    """Write ``{"key": key, **doc}`` atomically; a cache that cannot be written is only not kept."""
    try:
        write_json(path(kind, label, key), {"key": key, **doc}, indent=1)
    except OSError:
        pass


def recall(memory: dict, kind: str, label: str, device: torch.device | str, cls, field: str, **fields):
    """The result (a ``cls`` dataclass with a ``cached`` flag) of ``kind`` about ``device`` with ``fields``: from
    ``memory`` (this process), else from the disk (stored under ``field``, then kept in ``memory``); None if neither."""
    mem = (label, device_name(device), json.dumps(fields, sort_keys=True))
    if mem in memory:
        return memory[mem]
    stored = load(kind, label, key(device, **fields))
    if stored is None:
        return None
    result = cls(**{**stored[field], "cached": True})
    memory[mem] = result
    return result


def keep(memory: dict, kind: str, label: str, device: torch.device | str, result, field: str, **fields) -> None:
    """Keep ``result`` (a dataclass) in ``memory`` and on disk under ``field``, as ``recall`` finds it."""
    memory[(label, device_name(device), json.dumps(fields, sort_keys=True))] = result
    store(kind, label, key(device, **fields), {field: {**asdict(result), "cached": False}})


__all__ = ["cache_dir", "cache_root", "device_name", "fingerprint", "keep", "key", "load", "path", "recall", "store",
           "versions"]
