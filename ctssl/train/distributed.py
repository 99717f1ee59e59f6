"""Multi-process training: process-group setup from torchrun's environment, sync BN, and a
resumable, rank-aware batch sampler whose augmentations are seeded per sample.

The sampler splits every global batch into contiguous per-rank slices, so the ranks of a
step together see exactly the batch one process would see with ``batch_size x world_size``.
Each sample carries its own augmentation seed, derived from (seed, epoch, position): the
data a step sees does not depend on the number of ranks or DataLoader workers, nor on
whether the run was resumed.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError

# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when CUDA works, else the CPU; ``cuda``: the local rank's GPU;
    ``cpu``; or an explicit ``cuda:N``. ConfigError for a name that is none of these or a GPU not here."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if preference in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available here (use cpu or auto)")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ConfigError(f"--device {preference}: not a device name (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {preference} was asked for but CUDA is not available here (use cpu or auto)")
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl on GPUs, gloo on the CPU. Without WORLD_SIZE > 1 this is a single-process context.
    An already initialised group is reused (and not destroyed by ``shutdown``).
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_preference, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=False)
    if world <= 1:
        return DistContext(0, 1, 0, resolve_device(device_preference, 0))
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_object(ctx: DistContext, obj):
    """Every rank's ``obj`` as a list (rank order); ``[obj]`` without a process group."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a float tensor (for logging)."""
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / ctx.world_size


# ---------------------------------------------------------------------------------------------
# synchronized BatchNorm and the DDP wrapper
# ---------------------------------------------------------------------------------------------

def _bn_group(bn):
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _dense_sync_bn_on_rows(bn, x: torch.Tensor) -> torch.Tensor:
    """Synchronized BN of a dense CPU tensor (B, C), (B, C, H, W) or (B, C, D, H, W) via the engine's row
    BatchNorm."""
    from ctssl.sparse.batchnorm_rows import batch_norm_rows, running_momentum

    if x.dim() not in (2, 4, 5):
        raise ValueError(f"{type(bn).__name__}: expected a 2-D, 4-D or 5-D input, got shape {tuple(x.shape)}")
    channels_last = x if x.dim() == 2 else x.movedim(1, -1)  # (B, *spatial, C)
    rows = channels_last.reshape(-1, x.shape[1])
    momentum = running_momentum(bn)
    out = batch_norm_rows(rows, bn.weight, bn.bias,
                          bn.running_mean if bn.track_running_stats else None,
                          bn.running_var if bn.track_running_stats else None,
                          True, momentum, bn.eps, process_group=_bn_group(bn))
    if x.dim() == 2:
        return out
    return out.reshape(channels_last.shape).movedim(-1, 1)


def _needs_rows_path(bn, x) -> bool:
    return isinstance(x, torch.Tensor) and bn.training and not x.is_cuda and _bn_group(bn) is not None


_CPU_CLASSES: dict[type, type] = {}


def _cpu_sync_class(base: type, parent: type) -> type:
    """A class for converted BN modules of type ``base`` that also handles dense CPU inputs under gloo.

    torch's SyncBatchNorm refuses CPU tensors, and DDP refuses CPU modules holding one; a dense
    CPU map is normalised here as rows by the engine's synchronized row BatchNorm (one
    all-reduce of sum, sum of squares, count), the reduction ctssl's SyncBatchNorm does on
    sparse maps. ``parent`` is the class the new one derives from (for torch's SyncBatchNorm:
    plain ``nn.BatchNorm1d``, which DDP accepts); other inputs go to ``base.forward``.
    """
    if base not in _CPU_CLASSES:
        def forward(self, x):
            if _needs_rows_path(self, x):
                return _dense_sync_bn_on_rows(self, x)
            return base.forward(self, x)

        namespace = {"forward": forward, "__doc__": _cpu_sync_class.__doc__}
        if parent is not base:  # nn.SyncBatchNorm -> BatchNorm1d: keep its group, check 2-D/3-D input
            namespace["process_group"] = None
        _CPU_CLASSES[base] = type(f"CpuSync{parent.__name__}", (parent,), namespace)
    return _CPU_CLASSES[base]


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm synchronize across ranks (sparse-aware for the encoder's 2-D and 3-D BN).

    Uses the method's own ``convert_sync_batchnorm`` when it has one (ctssl.ssl methods: ctssl's
    SyncBatchNorm for 2-D and 3-D BN, torch's for the heads' BatchNorm1d), else ctssl's converter. On the
    CPU the converted modules also accept dense inputs (torch's own do not).
    """
    from ctssl.sparse.modules import SyncBatchNorm, convert_sync_batchnorm

    if hasattr(module, "convert_sync_batchnorm"):
        module = module.convert_sync_batchnorm() or module
    else:
        module = convert_sync_batchnorm(module)
    if device.type == "cpu":
        for m in module.modules():
            if type(m) is SyncBatchNorm:
                m.__class__ = _cpu_sync_class(SyncBatchNorm, SyncBatchNorm)
            elif type(m) is nn.SyncBatchNorm:
                m.__class__ = _cpu_sync_class(nn.SyncBatchNorm, nn.BatchNorm1d)
    return module


def wrap_ddp(module: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when there are several ranks.

    Buffers are not broadcast each step: BN statistics are kept equal by SyncBatchNorm.
    """
    if not ctx.distributed:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kwargs = {"device_ids": [ctx.device.index] if ctx.device.type == "cuda" else None,
              "find_unused_parameters": find_unused_parameters}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # newer torch; buffers still agree at init (same seed)
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


# ---------------------------------------------------------------------------------------------
# data order and per-sample augmentation seeds
# ---------------------------------------------------------------------------------------------

def derive_seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(1)[0])


class ResumableBatchSampler:
    """Batches of ``(index, sample_seed)`` for one rank; can start at any batch of an epoch.

    Epoch ``e`` visits ``randperm(len)`` seeded from (seed, e). Global batch ``t`` is
    ``perm[t*G:(t+1)*G]`` (G = batch_size x world_size) and rank ``r`` takes its ``r``-th
    contiguous slice of ``batch_size``. The incomplete last global batch is dropped.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = self.dataset_len // self.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the data set has {self.dataset_len} images, fewer than one global batch of "
                              f"{self.global_batch} (batch_size {self.batch_size} x {self.world_size} ranks)")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _epoch_tables(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0x5EED))
        perm = torch.randperm(self.dataset_len, generator=g)
        seeds = torch.randint(0, 2 ** 62, (self.dataset_len,), generator=g, dtype=torch.int64)
        return perm, seeds

    def __iter__(self):
        perm, seeds = self._epoch_tables(self.epoch)
        for t in range(self.start_batch, self.steps_per_epoch):
            start = t * self.global_batch + self.rank * self.batch_size
            yield [(int(perm[i]), int(seeds[i])) for i in range(start, start + self.batch_size)]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def state_dict(self, batches_done: int) -> dict:
        return {"epoch": self.epoch, "batch": int(batches_done), "seed": self.seed, "dataset_len": self.dataset_len,
                "batch_size": self.batch_size, "world_size": self.world_size}


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed python, numpy and torch CPU RNGs for a block, and restore the previous states after."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededItems(Dataset):
    """A dataset indexed by ``(index, seed)``: each item's random augmentations use its own seed.

    The caller's RNG states are restored after each item, so loading in the main process
    (workers=0) leaves the training RNG untouched.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_rng(seed):
            return self.dataset[index]


# ---------------------------------------------------------------------------------------------
# RNG state of a process
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's python, numpy, torch CPU and CUDA RNG states, as weights_only-safe objects."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


__all__ = ["DistContext", "init_distributed", "shutdown", "barrier", "all_gather_object", "broadcast_object",
           "mean_across_ranks", "convert_batchnorm", "wrap_ddp", "derive_seed", "ResumableBatchSampler", "SeededItems",
           "seeded_rng", "rng_state", "set_rng_state", "seed_everything", "resolve_device"]
