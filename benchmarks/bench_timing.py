"""Correct timing and memory figures for device work.

GPU work is asynchronous, so a host clock read without a synchronization measures
the launch, not the work. Two tools here:
- ``time_with_pytest_benchmark``: pytest-benchmark's host clock around a target
  that synchronizes at its end, with a setup that synchronizes (and hands over the
  next input set) before the clock starts;
- ``event_times_ms``: CUDA events around each step (host clock with a
  synchronization on a CPU), for the stand-alone harness ``encoder_timing.py``.
Both warm up first (compilation, autotuning, handle creation stay out) and rotate
among several input sets so repeated steps do not just re-read the cache.
On a CPU, where torch's allocator is invisible to Python, ``cpu_times_and_peaks``
reads the process's peak resident memory around each step instead (Linux).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the setting afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functional wrappers)
        return None


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    This is the activation memory a training step keeps alive between forward and
    backward; parameters and inputs (``exclude``) are not counted. It is the memory
    figure on a CPU, where torch's allocator is invisible to tracemalloc.
    """
    seen = {k for k in (_storage_key(t) for t in exclude) if k is not None}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        key = _storage_key(t)
        if key is not None and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before it
    (weights, inputs and optimizer state of a warmed-up step are the baseline). None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


PEAK_RSS_METHOD = ("peak resident set size (VmHWM) during the step minus the resident set size (VmRSS) just "
                   "before it; before each step the garbage collector runs, malloc_trim(0) returns freed heap "
                   "memory to the system and the high-water mark is reset through /proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap memory may stay resident (counted in the base)
        pass


def peak_rss_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory while ``fn`` runs above the resident memory just before it (see
    ``PEAK_RSS_METHOD``); None where /proc does not allow resetting the high-water mark."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else (peak - base) * 1024


def cpu_times_and_peaks(step: Callable[[Any], Any], inputs: Sequence[Any], *, iters: int,
                        warmup: int) -> tuple[list[float], list[int | None]]:
    """Host-clock ms and peak resident bytes (``peak_rss_bytes``) of each of ``iters`` steps after ``warmup``
    (the clock covers the step only, not the memory bookkeeping)."""
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    times: list[float] = []
    peaks: list[int | None] = []
    for i in range(iters):
        t: list[float] = []

        def timed(x=inputs[i % len(inputs)]):
            t0 = time.perf_counter()
            step(x)
            t.append((time.perf_counter() - t0) * 1e3)

        peaks.append(peak_rss_bytes(timed))
        times.append(t[0])
    return times, peaks


def memory_figures(step: Callable[[Any], Any], inputs: Any, device: torch.device,
                   exclude: Iterable[torch.Tensor] = (), backward: bool = True) -> dict[str, Any]:
    """Memory entries for ``extra_info`` from two untimed runs of ``step(inputs)``."""
    info: dict[str, Any] = {}
    peak = peak_memory_bytes(lambda: step(inputs), device)
    if peak is not None:
        info["peak_mem_bytes"] = peak
    if backward:
        info["saved_activation_bytes"] = saved_activation_bytes(lambda: step(inputs), exclude)
    if peak is None:
        info["memory_note"] = "CPU: peak allocator memory not measured; saved_activation_bytes is what autograd keeps"
    return info


def time_with_pytest_benchmark(benchmark, step: Callable[[Any], Any], inputs: Sequence[Any], *,
                               device: torch.device, rounds: int, warmup_rounds: int, images: int,
                               info: dict[str, Any], exclude: Iterable[torch.Tensor] = (),
                               backward: bool = True, threads: int | None = None) -> None:
    """Time ``step`` on rotating ``inputs`` with pytest-benchmark; fill ``benchmark.extra_info``.

    With ``--benchmark-disable`` (CI) the step runs exactly once and nothing is measured.
    """
    if threads is not None:
        info = {**info, "torch_threads": threads}
    with torch_threads(threads):
        _time_with_pytest_benchmark(benchmark, step, inputs, device, rounds, warmup_rounds, images, info,
                                    exclude, backward)


def _time_with_pytest_benchmark(benchmark, step, inputs, device, rounds, warmup_rounds, images, info, exclude,
                                backward) -> None:
    benchmark.extra_info.update(info)
    benchmark.extra_info["images"] = images
    if benchmark.disabled:
        benchmark.pedantic(step, args=(inputs[0],), rounds=1, iterations=1)
        synchronize(device)
        return
    step(inputs[0])  # first run: compilation, autotuning, caches, lazily built tables
    synchronize(device)
    benchmark.extra_info.update(memory_figures(step, inputs[0], device, exclude, backward))
    cycle = itertools.cycle(inputs)

    def setup():
        x = next(cycle)
        synchronize(device)
        return (x,), {}

    def target(x):
        step(x)
        synchronize(device)  # the host clock stops only after the device finished

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["images_per_s"] = images / median if median > 0 else None


def event_times_ms(step: Callable[[Any], Any], inputs: Sequence[Any], *, device: torch.device,
                   iters: int, warmup: int) -> tuple[list[float], float]:
    """Per-step times in ms (CUDA events; host clock + synchronize on a CPU) and the mean wall
    time per step in ms over the whole timed loop (includes host overhead the device did not hide)."""
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    synchronize(device)
    times: list[float] = []
    wall0 = time.perf_counter()
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            step(inputs[i % len(inputs)])
            ends[i].record()
        synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            step(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
    wall_ms = (time.perf_counter() - wall0) * 1e3 / max(iters, 1)
    return times, wall_ms


def summary_ms(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of a list of times."""
    ordered = sorted(times)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median_ms": statistics.median(ordered), "q1_ms": q1, "q3_ms": q3,
            "min_ms": ordered[0], "max_ms": ordered[-1]}
