"""ctssl checkpoints: atomic writes, validated reads, and backbone export.

A checkpoint is ``torch.save`` of a dict::

    {"format": "ctssl-checkpoint", "version": 1, "method": str, "arch": str, "in_chans": int,
     "config": asdict(PretrainConfig), "step": int, "epoch": int,
     "model": method.state_dict(), "backbone": method.backbone.state_dict(),
     "optimizer": ..., "schedules": ..., "scaler": ... or None, "sampler": ..., "rng": [per rank],
     "world_size": int}

Only tensors, numbers, strings, lists, tuples and dicts are stored, so every read uses
``torch.load(weights_only=True)``. ``backbone`` is a plain torchvision ResNet state_dict (fc included).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import replace_atomically

FORMAT = "ctssl-checkpoint"
VERSION = 1
LAST = "checkpoint_last.pt"
FINAL = "checkpoint_final.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not what the caller needs."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` so that ``path`` always holds either the old or the new complete file.

    A failed write (full disk, read-only) leaves ``path`` untouched, removes its temp file and
    raises ``ctssl.atomic.OutputError`` with one line.
    """
    with replace_atomically(path) as tmp:
        torch.save(obj, str(tmp))  # by path: torch's own (faster) file writer
    return Path(path)


def read_file(path: str | os.PathLike) -> Any:
    """A torch file read with ``weights_only=True`` (tensors, numbers, strings, containers), or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, unsafe globals...
        raise CheckpointError(_unreadable(path, exc)) from None


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``path`` cannot be read, in our words: torch's own message advises loading it with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(exc).strip()
    if "Unsupported global" in text:
        return (f"{path} holds Python objects other than tensors and plain values: it is neither a ctssl "
                f"checkpoint nor a state_dict, and ctssl does not load such files")
    if text.startswith("Weights only load failed"):
        reason = "its data cannot be unpickled"
    else:
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return f"checkpoint {path} is corrupt or not a torch file ({reason})"


def is_ctssl_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A full ctssl checkpoint (for resuming), checked for format, version and required keys."""
    obj = read_file(path)
    if not is_ctssl_checkpoint(obj):
        raise CheckpointError(f"{path} is not a ctssl checkpoint (no format={FORMAT!r} entry)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: ctssl checkpoint version {obj.get('version')} is not supported "
                              f"(this ctssl reads version {VERSION})")
    missing = [k for k in ("method", "arch", "in_chans", "config", "step", "epoch", "model", "backbone")
               if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: ctssl checkpoint lacks {', '.join(missing)}")
    return obj


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` detached, contiguous and on the CPU (channels-last undone)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def export_backbone(source: str | os.PathLike | torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the backbone as a plain state_dict (torchvision's / timm's keys, classifier included) to ``path``,
    atomically.

    ``source`` is the backbone module or any file ``ctssl.train.weights.read_weights`` reads (a ctssl
    checkpoint, an export, a torchvision / timm / SparK file).
    """
    if isinstance(source, torch.nn.Module):
        state = plain_state_dict(source)
    else:
        from .weights import read_weights  # weights reads files through this module

        state = {k: v.contiguous() for k, v in read_weights(source, flag="").backbone.items()}
    return save_atomic(state, path)


__all__ = ["FORMAT", "VERSION", "LAST", "FINAL", "CheckpointError", "save_atomic", "load_checkpoint", "read_file",
           "export_backbone", "plain_state_dict", "is_ctssl_checkpoint"]
