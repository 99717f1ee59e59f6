"""Released weight files as state_dicts: the wrapper dicts they come in, and keys renamed by rules.

One rule for ConvNeXt's own loader (official / SparK key layouts) and ``ctssl.train.weights`` (every family).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

WRAPPERS = ("model", "state_dict", "module")
"""Keys under which released checkpoints hold their state_dict."""


def is_tensor_dict(obj) -> bool:
    """A non-empty mapping of names to tensors (a state_dict)."""
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj) -> dict[str, torch.Tensor] | None:
    """``obj`` itself when it is a state_dict, else the state_dict under one of ``WRAPPERS``; None if neither."""
    if is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPERS:
            if is_tensor_dict(obj.get(key)):
                return dict(obj[key])
    return None


def rename_key(key: str, rules: Sequence[tuple[str, str]]) -> str:
    """``key`` renamed by the first ``(pattern, replacement)`` rule whose pattern matches it; unchanged if none."""
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key
