"""A backend's self-check on a device, and the cached verdicts ``auto`` trusts.

The custom backends (``triton``, ``cuda``) will meet cards and driver stacks nobody here has
tested. Before ``auto`` selects one on a device for the first time, ``trusted`` runs a small check
there: a masked conv, BatchNorm, ReLU, max pool and a second conv + BatchNorm, and for a backend that
runs ConvNeXt also a depthwise 7x7 conv reaching two patches away, LayerNorm and GELU, forward and
backward (output, image gradient, every parameter gradient, running statistics), in float32 against
the ``dense`` reference in float64 on the same device. The verdict is kept in memory and on disk
(``$XDG_CACHE_HOME/ctssl/self-check/``, default ``~/.cache/ctssl``), keyed by backend, device name,
ctssl, torch, CUDA and triton versions and a fingerprint of ctssl's files (a changed kernel is
checked again; the rule, shared with ``speed_rank``: ``device_cache``). A backend that fails is skipped by
``auto`` with one warning naming the failure.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import device_cache
from .device_cache import device_name

TOLERANCE = 1e-2
"""Largest relative error accepted: float32 (TF32 on GPUs) against float64. A wrong kernel is off by far more."""

_verdicts: dict[tuple, "Verdict"] = {}


@dataclass
class Verdict:
    """The outcome of one self-check of ``backend`` on ``device`` (the device's name)."""

    backend: str
    device: str
    ok: bool
    seconds: float
    error: str | None = None
    forward_only: bool = False
    cached: bool = False


def run_self_check(backend, device: torch.device | str = "cpu", forward_only: bool | None = None) -> Verdict:
    """Check ``backend`` (a Backend) on ``device`` against dense; never raises (a crash is a failed check).

    ``forward_only`` (default: when the backend cannot train on ``device``) skips the backward."""
    device = torch.device(device)
    if forward_only is None:
        forward_only = backend.training_unsupported_reason(device) is not None
    start = time.perf_counter()
    try:
        with torch.inference_mode(False):  # whatever mode the caller is in
            errors = _errors(backend, device, forward_only)
        worst = max(errors, key=errors.get)
        error = None if errors[worst] <= TOLERANCE else (
            f"{worst} differs from dense by {errors[worst]:.3g} (relative; tolerance {TOLERANCE:g})")
    except Exception as exc:  # noqa: BLE001 (any failure of the backend fails its check)
        error = error_line(exc)
    return Verdict(backend.name, device_name(device), error is None, time.perf_counter() - start, error,
                   forward_only)


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): how a backend's failure is reported."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _network(convnext: bool):
    """ResNet's ops; with ``convnext`` also ConvNeXt's block (depthwise 7x7, LayerNorm, GELU)."""
    from .modules import GELU, BatchNorm2d, Conv2d, LayerNorm2d, MaxPool2d, ReLU

    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        layers = [Conv2d(3, 8, 3, padding=1, bias=False), BatchNorm2d(8), ReLU(),
                  MaxPool2d(3, 2, 1), Conv2d(8, 8, 3, padding=1, bias=False), BatchNorm2d(8)]
        if convnext:
            layers += [Conv2d(8, 8, 7, padding=3, groups=8), LayerNorm2d(8), GELU()]
        net = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for m in net:
                if isinstance(m, (BatchNorm2d, LayerNorm2d)):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return net


def _run(net, images, active, weights, backend, dtype, forward_only):
    from . import sparse_input

    m = copy.deepcopy(net).to(images.device, dtype).train()
    x = images.detach().to(dtype, copy=True).requires_grad_(not forward_only)
    with torch.set_grad_enabled(not forward_only):
        out = m(sparse_input(x, active, backend, patch_size=x.shape[-1] // active.shape[-1])).to_dense()
        result = {"output": out.detach()}
        if not forward_only:
            (out * weights.to(dtype)).sum().backward()
            result["image gradient"] = x.grad
            result.update({f"gradient of {n}": p.grad for n, p in m.named_parameters()})
    result.update({f"buffer {n}": b for n, b in m.named_buffers() if b.is_floating_point()})
    return result


def _errors(backend, device: torch.device, forward_only: bool) -> dict[str, float]:
    """Relative error of every compared tensor: ``backend`` in float32 against ``dense`` in float64."""
    from .backends.base import CONVNEXT_OPS

    convnext = CONVNEXT_OPS <= backend.supported_ops
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64).to(device)
    if convnext:  # 4-pixel patches: 2 pixels after the pool, so the 7x7 window reaches 2 patches away
        active = torch.rand(2, 16, 16, generator=gen) < 0.4
        active[1] = False  # an image with nothing visible
    else:
        active = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    active = active.to(device)
    weights = torch.randn(2, 8, 32, 32, generator=gen, dtype=torch.float64).to(device)
    net = _network(convnext)
    with torch.autocast(device.type, enabled=False):
        want = _run(net, images, active, weights, "dense", torch.float64, forward_only)
        got = _run(net, images, active, weights, backend, torch.float32, forward_only)
    errors = {}
    for name, ref in want.items():
        value = got[name].double()
        if not torch.isfinite(value).all():
            errors[name] = float("inf")
            continue
        scale = float(ref.norm())
        errors[name] = float((value - ref).norm()) / (scale if scale > 0 else 1.0)
    return errors


# --- verdict cache (the rule: ctssl.sparse.device_cache) -------------------------------------------

KIND = "self-check"


def cache_dir() -> Path:
    """Where verdicts are kept: ``$XDG_CACHE_HOME/ctssl/self-check`` (``~/.cache`` by default)."""
    return device_cache.cache_dir(KIND)


def cached_verdict(backend, device: torch.device | str) -> Verdict | None:
    """The verdict already known for ``backend`` on ``device`` (this process, then the disk), or None."""
    return device_cache.recall(_verdicts, KIND, backend.name, device, Verdict, "verdict", backend=backend.name)


def record(backend, device: torch.device | str, verdict: Verdict) -> None:
    """Keep ``verdict`` in memory and on disk (written atomically; an unwritable cache is only not kept)."""
    device_cache.keep(_verdicts, KIND, backend.name, device, verdict, "verdict", backend=backend.name)


def check(backend, device: torch.device | str) -> Verdict:
    """The cached verdict of ``backend`` on ``device``, or a fresh self-check (then cached)."""
    verdict = cached_verdict(backend, device)
    if verdict is None:
        verdict = run_self_check(backend, device)
        record(backend, device, verdict)
    return verdict


__all__ = ["TOLERANCE", "Verdict", "cache_dir", "cached_verdict", "check", "device_name", "error_line", "record",
           "run_self_check"]
