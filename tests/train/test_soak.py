"""Soak: the pre-training data pipeline and the training loop hold no memory that grows with the steps.

A leak of a few kilobytes per sample or per step is invisible in a 20-step test and fatal in a
week-long run (500k steps): these tests run long enough for such growth to stand out of the noise.
"""
from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ctssl.train import pretrain
from ctssl.train.distributed import ResumableBatchSampler, SeededItems

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

SAMPLES = 5000
WARMUP_SAMPLES = 1000
RSS_GROWTH_BOUND_MB = 8.0


def _rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` from /proc (VmRSS, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read resident memory")
def test_data_pipeline_memory_stays_flat_over_5000_samples(pretrain_store):
    """PretrainDataset over a slice store with 2 persistent DataLoader workers, as the trainer builds it
    (SparK's augmentation at 32 px, a new epoch every 16 images, so the per-epoch iterator reset of
    persistent workers is soaked too).

    Bound: after a 1000-sample warm-up (allocator pools, store handles, first shared-memory segments),
    4000 more samples may add at most 8 MB of resident memory over the main process and both workers
    together. Measured on the 2-core dev machine: 0.1 MB without a leak; 21 MB when the dataset keeps
    every 32x32 sample it returns (4 kB each): a leak of one sample per item fails, allocator noise
    does not. Open file descriptors (shared-memory handles of batches) must not grow either.
    """
    from ctssl.data import PretrainDataset

    from ..ssl.helpers import tiny_method

    transform = tiny_method("spark").train_transform(32)  # the trainer's transform, built by the method
    dataset = PretrainDataset(pretrain_store, size=32, channels=1, transform=transform)
    sampler = ResumableBatchSampler(len(dataset), 8, 0, 1, seed=0)
    loader = DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=2, persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))

    def processes() -> list[int]:
        workers = getattr(loader._iterator, "_workers", [])
        return [os.getpid()] + [w.pid for w in workers]

    seen, epoch, marks = 0, 0, {}
    checksum = 0.0
    while seen < SAMPLES:
        sampler.set_epoch(epoch)
        for batch in loader:
            checksum += float(batch[0, 0, 0, 0])  # touch the batch as training would
            seen += batch.shape[0]
            if seen >= WARMUP_SAMPLES and "warm" not in marks:
                gc.collect()
                marks["warm"] = (sum(_rss_mb(p) for p in processes()), _open_fds(os.getpid()), len(processes()))
        epoch += 1
    gc.collect()
    end = (sum(_rss_mb(p) for p in processes()), _open_fds(os.getpid()), len(processes()))
    growth = end[0] - marks["warm"][0]
    assert end[2] == marks["warm"][2] == 3  # the same persistent workers throughout
    assert growth < RSS_GROWTH_BOUND_MB, f"resident memory grew {growth:.1f} MB over {SAMPLES - WARMUP_SAMPLES} samples"
    assert end[1] <= marks["warm"][1] + 2, f"open files grew from {marks['warm'][1]} to {end[1]}"
    print(f"soak: {SAMPLES} samples, {epoch} epochs, resident memory {marks['warm'][0]:.1f} -> {end[0]:.1f} MB")


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _run_and_count(cfg, count_from: int | None = None) -> tuple[dict[int, int], dict[str, int]]:
    """Live tensors after each step from ``count_from`` on, and the sizes of the run's containers at its end."""
    counts: dict[int, int] = {}
    sizes: dict[str, int] = {}
    original = pretrain._Run._train_step

    def counting_step(self, model, method, optimizer, scaler, batch, step):
        out = original(self, model, method, optimizer, scaler, batch, step)
        if count_from is not None and step + 1 >= count_from:
            counts[step + 1] = _live_tensors()
        for holder, prefix in ((self, "run."), (getattr(self, "window", None), "window."),
                               (getattr(self, "throughput", None), "throughput.")):
            for name, value in vars(holder or object()).items():
                if isinstance(value, (list, dict, set)):
                    sizes[prefix + name] = len(value)
        return out

    pretrain._Run._train_step = counting_step
    try:
        pretrain.run_pretraining(cfg)
    finally:
        pretrain._Run._train_step = original
    return counts, sizes


def test_training_loop_keeps_no_per_step_state(pretrain_store, tiny_config, tmp_path):
    """N and 3N steps, logging every step, evaluating online and checkpointing every 2: from step N on, a step
    holds as many live tensors as the step 2 later (the same phase of those cycles), and no list/dict/set of the
    run, its log window or its throughput counter is larger after 3N steps than after N."""
    from .bars_data import write_npz

    bars = write_npz(tmp_path / "bars.npz", n=(8, 8, 4))
    n = 3
    common = dict(log_every=1, eval_every=2, ckpt_every=2, eval_data=bars, image_size=32)
    _, short_sizes = _run_and_count(tiny_config("byol", pretrain_store, tmp_path / "short", max_steps=n, **common))
    counts, sizes = _run_and_count(tiny_config("byol", pretrain_store, tmp_path / "long", max_steps=3 * n, **common),
                                   count_from=n)
    assert short_sizes == sizes, (short_sizes, sizes)
    assert [counts[s + 2] - counts[s] for s in range(n, 3 * n - 1)] == [0] * (2 * n - 1), counts
