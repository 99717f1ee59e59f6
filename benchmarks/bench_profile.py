"""Where a step's time goes: the top kernels of a few profiled steps (torch.profiler).

The headline timing says how fast a backend is; this says what stands in its way. On a
GPU the table ranks device kernels by their own (self) device time; on a CPU it ranks
operators by self CPU time, which is all a CPU has. Names are shortened (cuDNN and
Triton kernel names run to hundreds of characters) but kept distinct.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

NAME_CHARS = 90


def _self_time_us(event, on_gpu: bool) -> float:
    """Self device time on a GPU (attribute renamed across torch versions), self CPU time otherwise."""
    if on_gpu:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def kernel_profile(step: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, *,
                   steps: int = 3, top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step`` (already warmed up) and return the ``top`` entries.

    Returns {"unit": what was ranked, "steps": n, "total_ms_per_step": sum over all entries,
    "kernels": [{"name", "calls_per_step", "ms_per_step", "share"}]}."""
    if steps < 1 or top < 1:
        raise ValueError(f"kernel_profile: steps and top must be >= 1, got {steps} and {top}")
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(inputs[i % len(inputs)])
        if on_gpu:
            torch.cuda.synchronize(device)
    rows = []
    for ev in prof.key_averages():
        t = _self_time_us(ev, on_gpu)
        if t <= 0:
            continue
        if on_gpu and getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue  # a host-side op's accounting of its kernels: counted once, as the kernels
        rows.append((t, ev.key, ev.count))
    total = sum(t for t, _, _ in rows)
    rows.sort(reverse=True)
    kernels = [{"name": _short(name), "calls_per_step": count / steps, "ms_per_step": t / 1e3 / steps,
                "share": t / total if total > 0 else 0.0} for t, name, count in rows[:top]]
    return {"unit": "self device time per kernel" if on_gpu else "self CPU time per operator",
            "steps": steps, "total_ms_per_step": total / 1e3 / steps, "kernels": kernels}


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def profile_markdown(title: str, prof: dict[str, Any]) -> list[str]:
    """A Markdown table of one profile, under a ``###`` heading."""
    lines = [f"### {title}", "",
             f"{prof['unit']}, mean of {prof['steps']} profiled steps; all entries add up to "
             f"{prof['total_ms_per_step']:.2f} ms per step (profiler overhead included).", "",
             f"| {'kernel' if prof['unit'].startswith('self device') else 'operator'} | calls/step | ms/step | share |",
             "|---|---|---|---|"]
    for k in prof["kernels"]:
        name = k["name"].replace("|", "\\|")
        lines.append(f"| `{name}` | {k['calls_per_step']:.1f} | {k['ms_per_step']:.3f} | {100 * k['share']:.1f}% |")
    return lines + [""]


__all__ = ["kernel_profile", "profile_markdown"]
