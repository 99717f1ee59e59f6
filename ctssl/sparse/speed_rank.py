"""How fast each candidate backend runs a representative masked step on a device: measured once, then cached.

``auto`` picks, among the backends that can run a model on a device, the one that ran this workload fastest
there (``ctssl.sparse.backends.auto_backend``). The workload is one masked stage, forward and backward, at
SparK's mask ratio (``MASK_RATIO``), with the same weights and inputs for every candidate:

- models with ConvNeXt's ops (``CONVNEXT_OPS``): a ConvNeXt block (depthwise 7x7 conv, LayerNorm, Linear to 4x
  width, GELU, Linear back, layer scale, residual add);
- any other model: a ResNet basic block (3x3 conv, BatchNorm, ReLU, 3x3 conv, BatchNorm, residual add, ReLU).

On CUDA it runs in bf16 autocast and channels-last at a stage-1 size (``CUDA_WORKLOADS``), on the CPU in
float32 at a tiny size (``CPU_WORKLOADS``); always on 2-D images. Each candidate's time is the median of
``iterations`` timed steps after ``warmup`` untimed ones, candidates interleaved so that clock drift hits all
alike. A candidate that raises is left out of the ranking, its error kept. Rankings are kept in memory and on
disk (``$XDG_CACHE_HOME/ctssl/speed-rank/``), keyed by device name, workload family, the set of candidates, the
workload, versions and a fingerprint of ctssl's files (``ctssl.sparse.device_cache``).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import device_cache
from .backends.base import CONVNEXT_OPS
from .device_cache import device_name
from .self_check import error_line

KIND = "speed-rank"
MASK_RATIO = 0.6
"""SparK's mask ratio: the share of patches hidden in the timed step."""
CUDA_AUTOCAST = torch.bfloat16
"""The GPU step's autocast dtype: the training recipe's (``ctssl-train --amp auto``)."""


@dataclass(frozen=True)
class Workload:
    """The size of the timed step: ``batch`` maps of ``channels`` x ``side`` x ``side`` pixels, patches of
    ``patch`` pixels (so the mask grid is ``side / patch``), ``warmup`` untimed and ``iterations`` timed steps."""

    batch: int
    side: int
    channels: int
    patch: int
    warmup: int
    iterations: int


CUDA_WORKLOADS = {
    "resnet": Workload(batch=32, side=56, channels=64, patch=8, warmup=3, iterations=10),  # ResNet-50 stage 1
    "convnext": Workload(batch=32, side=56, channels=96, patch=8, warmup=3, iterations=10),  # ConvNeXt-T stage 1
}
CPU_WORKLOADS = {
    "resnet": Workload(batch=2, side=16, channels=8, patch=4, warmup=1, iterations=3),
    "convnext": Workload(batch=2, side=16, channels=8, patch=4, warmup=1, iterations=3),
}
FAMILIES = ("resnet", "convnext")

_rankings: dict[tuple, "Ranking"] = {}


@dataclass
class Ranking:
    """The measured step time of each candidate on ``device`` (its name) for a workload ``family``."""

    device: str
    family: str
    times_ms: dict[str, float]
    """Median milliseconds per step of each candidate that ran, fastest first."""
    errors: dict[str, str] = field(default_factory=dict)
    """Why each candidate that raised while timed was left out."""
    seconds: float = 0.0
    """Wall time of the whole measurement (warm-up and compilation included)."""
    cached: bool = False

    def fastest(self, names: Sequence[str] | None = None) -> str | None:
        """The fastest measured backend (among ``names``), or None when none of them ran."""
        ran = [n for n in self.times_ms if names is None or n in names]
        return min(ran, key=self.times_ms.get) if ran else None

    def summary(self) -> str:
        """``triton 1.23 ms, cuda 1.41 ms, torch 2.80 ms`` (fastest first)."""
        return ", ".join(f"{name} {ms:.3g} ms" for name, ms in self.times_ms.items())


def family(ops=None) -> str:
    """The workload that stands for a model with ``ops``: "convnext" when it has all of ConvNeXt's ops."""
    return "convnext" if ops is not None and CONVNEXT_OPS <= set(ops) else "resnet"


def workload(device: torch.device | str, family_name: str) -> Workload:
    """The timed step's size on ``device``: ``CUDA_WORKLOADS`` on a GPU, ``CPU_WORKLOADS`` elsewhere."""
    table = CUDA_WORKLOADS if torch.device(device).type == "cuda" else CPU_WORKLOADS
    return table[family_name]


# --- the workload -------------------------------------------------------------------------------

class _ResNetBlock(nn.Module):
    """A ResNet basic block at stage-1 width (the 3x3 convs of every ResNet stage)."""

    def __init__(self, channels: int):
        from .modules import BatchNorm2d, Conv2d, ReLU

        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(channels)
        self.relu = ReLU(inplace=True)
        self.conv2 = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as in ``ctssl.models.convnext``: depthwise 7x7, LayerNorm, MLP, layer scale, residual."""

    def __init__(self, channels: int):
        from .modules import GELU, Conv2d, LayerNorm, Linear

        super().__init__()
        self.conv_dw = Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = LayerNorm(channels, eps=1e-6)
        self.fc1 = Linear(channels, 4 * channels)
        self.act = GELU()
        self.fc2 = Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x):
        from .functional import scale_channels

        y = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x)))))
        return scale_channels(y, self.gamma) + x


def _inputs(family_name: str, work: Workload):
    """The block (on the CPU), a map batch and a patch mask; the same for every candidate (fixed seed)."""
    from .mask import random_patch_mask

    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        net = (_ConvNeXtBlock if family_name == "convnext" else _ResNetBlock)(work.channels)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(work.batch, work.channels, work.side, work.side, generator=gen)
    grid = work.side // work.patch
    active = random_patch_mask(work.batch, (grid, grid), MASK_RATIO, generator=gen)
    return net, images, active


def _stepper(net: nn.Module, images: torch.Tensor, active: torch.Tensor, backend, work: Workload,
             device: torch.device):
    """One training step of ``backend`` (forward, backward; no optimizer) as a function of nothing."""
    from . import sparse_input

    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    model = copy.deepcopy(net).to(device).to(memory_format=layout).train()
    images = images.to(device).contiguous(memory_format=layout)
    active = active.to(device)

    def step():
        x = images.detach().requires_grad_()
        with torch.autocast(device.type, dtype=CUDA_AUTOCAST, enabled=cuda):
            out = model(sparse_input(x, active, backend, patch_size=work.patch, check_finite=False)).to_dense()
        out.float().sum().backward()
        for p in model.parameters():
            p.grad = None

    return step


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(backends: Sequence, device: torch.device | str, ops=None, *, work: Workload | None = None) -> Ranking:
    """Time ``backends`` (Backend objects) on ``device`` with the workload for ``ops``; never raises for a
    backend's failure (it is left out, with its error). ``work`` overrides the size (default: ``workload``)."""
    device = torch.device(device)
    name = family(ops)
    work = work or workload(device, name)
    start = time.perf_counter()
    errors: dict[str, str] = {}
    samples: dict[str, list[float]] = {}
    steps = {}
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        net, images, active = _inputs(name, work)
        for backend in backends:
            try:
                step = _stepper(net, images, active, backend, work, device)
                for _ in range(work.warmup):
                    _timed(step, device)
            except Exception as exc:  # noqa: BLE001 (any failure drops the backend from the ranking)
                errors[backend.name] = error_line(exc)
                continue
            steps[backend.name], samples[backend.name] = step, []
        for _ in range(max(1, work.iterations)):
            for backend_name in list(steps):
                try:
                    samples[backend_name].append(_timed(steps[backend_name], device))
                except Exception as exc:  # noqa: BLE001
                    errors[backend_name] = error_line(exc)
                    del steps[backend_name], samples[backend_name]
    times = {n: 1e3 * statistics.median(s) for n, s in samples.items()}
    return Ranking(device_name(device), name, dict(sorted(times.items(), key=lambda item: item[1])), errors,
                   time.perf_counter() - start)


# --- the ranking cache (the rule: ctssl.sparse.device_cache) ------------------------------------

def _fields(names: Sequence[str], device: torch.device | str, family_name: str) -> dict:
    """What a ranking is about, besides the device and versions: the family, the candidates, the workload."""
    return {"family": family_name, "candidates": sorted(names), "workload": asdict(workload(device, family_name))}


def cached_ranking(names: Sequence[str], device: torch.device | str, ops=None) -> Ranking | None:
    """The ranking already measured for the candidates ``names`` on ``device`` (this process, then the disk)."""
    name = family(ops)
    return device_cache.recall(_rankings, KIND, name, device, Ranking, "ranking", **_fields(names, device, name))


def record(names: Sequence[str], device: torch.device | str, ops, ranking: Ranking) -> None:
    """Keep ``ranking`` of the candidates ``names`` in memory and on disk."""
    name = family(ops)
    device_cache.keep(_rankings, KIND, name, device, ranking, "ranking", **_fields(names, device, name))


def rank(backends: Sequence, device: torch.device | str, ops=None, *, fresh: bool = False) -> Ranking:
    """The cached ranking of ``backends`` on ``device`` for ``ops``, or (none cached, or ``fresh``) a new
    measurement, then cached."""
    names = [b.name for b in backends]
    ranking = None if fresh else cached_ranking(names, device, ops)
    if ranking is None:
        ranking = measure(backends, device, ops)
        record(names, device, ops, ranking)
    return ranking


def cache_dir():
    """Where rankings are kept: ``$XDG_CACHE_HOME/ctssl/speed-rank``."""
    return device_cache.cache_dir(KIND)


__all__ = ["CPU_WORKLOADS", "CUDA_AUTOCAST", "CUDA_WORKLOADS", "FAMILIES", "MASK_RATIO", "Ranking", "Workload",
           "cache_dir", "cached_ranking", "family", "measure", "rank", "record", "workload"]
