"""pytest setup for the benchmark suites: import path, machine info, the run fixture.

``pytest benchmarks/ --benchmark-only`` times every case; the project's default
``--benchmark-disable`` (CI) runs every benchmark body exactly once, so a broken
benchmark fails CI without costing time.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_config import PROFILE, device_name, registry_status, versions  # noqa: E402
from bench_timing import time_with_pytest_benchmark  # noqa: E402


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """``--benchmark-only`` asks for timings: let it win over the project's default
    ``--benchmark-disable`` (pyproject addopts, for CI) instead of failing with a usage error."""
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_disable", False):
        config.option.benchmark_enable = True


def pytest_benchmark_update_machine_info(config, machine_info):
    """Card, versions, profile and backend status travel with every saved result file."""
    machine_info["ctssl"] = {
        "device": str(PROFILE.device),
        "device_name": device_name(PROFILE.device),
        "profile": PROFILE.name,
        "profile_notes": list(PROFILE.notes),
        "versions": versions(),
        "backend_status": {k: ("available" if v is None else v) for k, v in registry_status().items()},
        "git_commit": _git_commit(),
        "command": "pytest " + " ".join(sys.argv[1:]),
        # other work on the machine distorts CPU figures: record how busy it was when the run ended
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def pytest_report_header(config):
    return (f"ctssl benchmarks: profile {PROFILE.name} on {device_name(PROFILE.device)}; "
            f"op batch {PROFILE.op_batch} @ {PROFILE.op_size}px, models {PROFILE.encoder} "
            f"batch {PROFILE.model_batch} @ {PROFILE.model_size}px, {PROFILE.precision}")


@pytest.fixture
def profile():
    return PROFILE


@pytest.fixture
def run_workload(benchmark):
    """Time a ``Workload`` with pytest-benchmark and record the figures beside its time."""
    card = device_name(PROFILE.device)
    vers = versions()

    def run(work, group: str, rounds: int | None = None):
        benchmark.group = group
        info = {**work.info, "device_name": card, "torch": vers["torch"], "triton": vers["triton"]}
        time_with_pytest_benchmark(
            benchmark, work.step, work.inputs, device=PROFILE.device,
            rounds=rounds or PROFILE.rounds, warmup_rounds=PROFILE.warmup_rounds, images=work.images,
            info=info, exclude=work.exclude, backward=work.backward, threads=PROFILE.threads)
    return run
