"""Time a masked encoder (ResNet or ConvNeXt, fwd+bwd) on every backend, with peak memory, in one run.

The measurement behind the headline claim: the packed backends against plain dense
(cuDNN, no mask) and SparK's dense emulation, at several mask ratios, on one card in
one process. Timing is done with CUDA events around each step after a warm-up, the
median of ``--iters`` steps, rotating among ``--rotate`` input sets; peak memory is
``max_memory_allocated`` above the warmed-up baseline. On a CPU the clock is the host's
and peak memory is the peak resident set size of each step above the one before it
(median over the steps; ``bench_timing.PEAK_RSS_METHOD``), with ``--isolate`` running
every case in a fresh process. Every backend runs the same weights on the same inputs,
and the loss of its first step is compared with the dense emulation's as a sanity check
(a wrong backend must not look fast). Any registered encoder: a 3-D one
(``--arch resnet18_3d``) takes cubic volumes of side ``--size``.

Results are written after every configuration, so a run cut short keeps what it
measured. Example (what ``gpu_check.sh`` runs)::

    python benchmarks/encoder_timing.py --arch resnet50 --batch 128 --size 224 \\
        --mask-ratios 0.6,0.3,0.9 --precision bf16 --channels-last \\
        --json out/encoder_timing.json --markdown out/encoder_timing.md
    python benchmarks/encoder_timing.py --device cpu --arch resnet18_3d --batch 2 --size 96 \\
        --mask-ratios 0.6 --backends dense,torch --precision fp32 --isolate --json out/vol.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_config import (  # noqa: E402
    CPU_NO_BACKWARD,
    CPU_NOT_TIMED,
    EMULATION,
    NOMASK,
    PROFILE,
    backend_names,
    device_name,
    registry_status,
    versions,
)
from bench_profile import kernel_profile, profile_markdown  # noqa: E402
from bench_timing import (  # noqa: E402
    PEAK_RSS_METHOD,
    cpu_times_and_peaks,
    event_times_ms,
    peak_memory_bytes,
    saved_activation_bytes,
    summary_ms,
    synchronize,
    torch_threads,
)

FORMAT = "ctssl-encoder-timing/1"
SPARK_REFERENCE_IMAGES_PER_S = 800 * 1_281_167 / (48 * 3600 * 32)
"""SparK's own ResNet-50 pre-training, the figure its users know: 800 ImageNet epochs (1,281,167 images) on 32 A100s
in about 48 h with the dense emulation, about 185 images/s per A100 (paper-notes.md)."""
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
LOSS_TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 1e-3}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50", help="any registered encoder (resnet50, convnext_small, ...)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--mask-ratios", default="0.6,0.3,0.9", help="comma-separated, timed in this order")
    ap.add_argument("--backends", default="all",
                    help=f"comma-separated names or 'all' ({NOMASK}, {EMULATION} and every registered backend)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16", help="autocast dtype (fp32: none)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rotate", type=int, default=3, help="input sets cycled through")
    ap.add_argument("--spark", action="store_true",
                    help="also time a whole SparK step per backend at the first mask ratio (needs ctssl.ssl)")
    ap.add_argument("--no-encoder", action="store_true", help="with --spark: time only the SparK steps")
    ap.add_argument("--decoder-impls", default="eager",
                    help="SparK step: comma-separated decoder implementations (eager, channels-last, subpixel, "
                         "compiled; '+' combines them). The first runs on every backend (the emulation's step is "
                         "the baseline), the others on --decoder-backend")
    ap.add_argument("--decoder-backend", default="auto",
                    help="the backend the other decoder implementations run on (auto: what `--backend auto` picks "
                         "on this device for this encoder)")
    ap.add_argument("--spark-target", type=float, default=0.0, metavar="SPEEDUP",
                    help="goal: the fastest SparK step at least SPEEDUP times faster than the emulation's step "
                         "(first decoder implementation); exit code 3 when missed")
    ap.add_argument("--decoder-width", type=int, default=768)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads while timing (default: 1 on a CPU, unchanged on a GPU)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="stop starting new configurations after this many seconds (0: no limit)")
    ap.add_argument("--profile-kernels", type=int, default=0, metavar="TOP",
                    help="also profile each backend's encoder step at the first mask ratio and keep its TOP kernels")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps recorded by --profile-kernels")
    ap.add_argument("--target", action="append", default=[], metavar="BACKEND:BASELINE:SPEEDUP",
                    help="a goal to check and record: BACKEND at least SPEEDUP times faster than BASELINE at the "
                         "first mask ratio (e.g. triton:dense-nomask:2); exit code 3 when one is missed")
    ap.add_argument("--budget", action="append", default=[], metavar="BACKEND:MS[:GIB]",
                    help="an absolute goal to check and record: BACKEND's encoder step at the first mask ratio at most "
                         "MS milliseconds (and GIB GiB peak memory), e.g. triton:10:2.5; exit code 3 when missed")
    ap.add_argument("--falls-with-mask", action="store_true",
                    help="a goal: every packed backend timed at several mask ratios is faster at a higher ratio "
                         "(checked and recorded; exit code 3 when one is not)")
    ap.add_argument("--isolate", action="store_true",
                    help="run every (backend, mask ratio) case in a fresh process (encoder cases only)")
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--markdown", help="output Markdown path")
    args = ap.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.mask_ratios.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--mask-ratios must be comma-separated numbers, got {args.mask_ratios!r}")
    if not args.ratios or not all(0.0 <= r < 1.0 for r in args.ratios):
        ap.error(f"--mask-ratios must lie in [0, 1), got {args.mask_ratios!r}")
    if args.size % 32:
        ap.error(f"--size must be a multiple of 32 (the patch size), got {args.size}")
    if min(args.batch, args.iters, args.rotate) < 1 or args.warmup < 0:
        ap.error("--batch, --iters and --rotate must be positive, --warmup non-negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")
    args.targets = []
    for spec in args.target:
        parts = spec.split(":")
        try:
            args.targets.append((parts[0], parts[1], float(parts[2])))
            assert len(parts) == 3 and parts[0] and parts[1] and float(parts[2]) > 0
        except (IndexError, ValueError, AssertionError):
            ap.error(f"--target {spec!r}: expected BACKEND:BASELINE:SPEEDUP, e.g. triton:dense-nomask:2")
    args.budgets = []
    for spec in args.budget:
        parts = spec.split(":")
        try:
            assert len(parts) in (2, 3) and parts[0]
            ms, gib = float(parts[1]), (float(parts[2]) if len(parts) == 3 else None)
            assert ms > 0 and (gib is None or gib > 0)
        except (ValueError, AssertionError):
            ap.error(f"--budget {spec!r}: expected BACKEND:MS or BACKEND:MS:GIB, e.g. triton:10:2.5")
        args.budgets.append((parts[0], ms, gib))
    from ctssl.models import encoder_names
    if args.arch not in encoder_names():
        ap.error(f"--arch {args.arch!r} is not a registered encoder; choose one of {', '.join(encoder_names())}")
    if args.isolate and args.spark:
        ap.error("--isolate runs encoder cases only; leave out --spark")
    if args.no_encoder and not args.spark:
        ap.error("--no-encoder leaves nothing to time without --spark")
    from ctssl.models.decoder import parse_decoder_impl
    args.impls = [i.strip() for i in args.decoder_impls.split(",") if i.strip()]
    try:
        for impl in args.impls:
            parse_decoder_impl(impl)
    except ValueError as exc:
        ap.error(f"--decoder-impls: {exc}")
    if not args.impls:
        ap.error("--decoder-impls names no implementation")
    if args.spark_target < 0:
        ap.error("--spark-target must be positive (or 0: none)")
    return args


def encoder_facts(arch: str) -> tuple[int, frozenset[str]]:
    """``arch``'s spatial dimensions and the sparse ops its masked forward needs (from a weightless copy)."""
    from ctssl.models import create_encoder
    with torch.device("meta"):
        encoder = create_encoder(arch)
    return encoder.spatial_dims, encoder.sparse_ops


def pick_backends(spec: str) -> list[str]:
    names = backend_names()
    if spec == "all":
        return names
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise SystemExit(f"encoder_timing: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return wanted


def make_profile(args):
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    return dataclasses.replace(
        PROFILE, device=device, model_batch=args.batch, model_size=args.size, encoder=args.arch,
        amp_dtype=PRECISIONS[args.precision], channels_last=args.channels_last, rotate=args.rotate,
        decoder_width=args.decoder_width)


def why_not(name: str, device: torch.device, ops=None) -> str | None:
    """None if ``name`` can be timed here (with the encoder's ``ops``), else the reason."""
    if name == NOMASK:
        return None
    reason = registry_status().get(name)
    if reason is not None:
        return f"unavailable: {reason}"
    from ctssl.sparse import get_backend
    if ops is not None:
        try:
            get_backend(name).check_ops(ops, "this encoder")
        except ValueError as exc:
            return str(exc)
    if device.type == "cpu" and name in CPU_NOT_TIMED:
        return CPU_NOT_TIMED[name]
    if device.type == "cpu" and name in CPU_NO_BACKWARD:
        return CPU_NO_BACKWARD[name]
    try:
        get_backend(name, device)
    except Exception as exc:  # noqa: BLE001 - report any refusal as the reason
        return f"cannot run on {device}: {exc}"
    return None


def time_one(build, args, profile, kernels: bool = False) -> dict[str, Any]:
    """Build a workload, check its first loss, time it, measure its peak memory (and, with
    ``kernels``, profile a few steps by kernel)."""
    with torch_threads(args.threads if args.threads is not None else (1 if profile.device.type == "cpu" else None)):
        return _time_one(build, args, profile, kernels)


def _time_one(build, args, profile, kernels: bool) -> dict[str, Any]:
    device = profile.device
    work = build()
    loss = float(work.step(work.inputs[0]))
    synchronize(device)
    extra: dict[str, Any] = {}
    if device.type == "cpu":
        times, peaks = cpu_times_and_peaks(work.step, work.inputs, iters=args.iters, warmup=args.warmup)
        wall_ms = sum(times) / len(times)
        peak = None if None in peaks else int(statistics.median(peaks))
        extra = {"peak_mem_method": PEAK_RSS_METHOD, "peak_rss_bytes_per_step": peaks,
                 "saved_activation_bytes": saved_activation_bytes(lambda: work.step(work.inputs[0]), work.exclude)}
    else:
        times, wall_ms = event_times_ms(work.step, work.inputs, device=device, iters=args.iters, warmup=args.warmup)
        peak = peak_memory_bytes(lambda: work.step(work.inputs[0]), device)
    stats = summary_ms(times)
    row = {**work.info, **stats, "times_ms": times, "wall_ms_per_step": wall_ms,
           "images_per_s": work.images / (stats["median_ms"] / 1e3) if stats["median_ms"] > 0 else None,
           "peak_mem_bytes": peak, **extra, "loss": loss, "loss_finite": math.isfinite(loss), "status": "ok"}
    if kernels:
        try:
            row["kernel_profile"] = kernel_profile(work.step, work.inputs, device, steps=args.profile_steps,
                                                   top=args.profile_kernels)
        except Exception as exc:  # noqa: BLE001 - a profiler failure (CUPTI) must not cost the timing
            row["kernel_profile_error"] = f"{type(exc).__name__}: {exc}"
    return row


def machine_block(profile) -> dict[str, Any]:
    return {"device": str(profile.device), "device_name": device_name(profile.device), "versions": versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "backend_status": {k: ("available" if v is None else v) for k, v in registry_status().items()},
            "git_commit": os.environ.get("CTSSL_GIT_COMMIT", "unknown"),
            # other work on a shared machine distorts CPU figures: how busy it was at the start and the end
            "load_average_start": load_average(), "load_average_end": None}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def add_comparisons(rows: list[dict[str, Any]], precision: str, baseline_impl: str = "eager") -> None:
    """Speed-ups against the two baselines and the loss check against the emulation (for SparK steps: the
    emulation's step with the ``baseline_impl`` decoder, whatever decoder the compared step ran)."""
    def key(r):
        return (r.get("case_kind"), r.get("mask_ratio"))
    ok = [r for r in rows if r.get("status") == "ok"]
    nomask = {r.get("case_kind"): r for r in ok if r["backend"] == NOMASK}
    emulation = {key(r): r for r in ok if r["backend"] == EMULATION
                 and r.get("decoder_impl", baseline_impl) == baseline_impl}
    for r in ok:
        base = nomask.get(r.get("case_kind"))
        if base is not None:
            r["speedup_vs_nomask"] = base["median_ms"] / r["median_ms"]
        emu = emulation.get(key(r))
        if emu is not None and r["backend"] != NOMASK:
            r["speedup_vs_emulation"] = emu["median_ms"] / r["median_ms"]
            if r.get("peak_mem_bytes") and emu.get("peak_mem_bytes"):
                r["peak_mem_vs_emulation"] = r["peak_mem_bytes"] / emu["peak_mem_bytes"]
            if emu["loss"] != 0:
                r["loss_rel_diff_vs_emulation"] = abs(r["loss"] - emu["loss"]) / abs(emu["loss"])
                r["loss_check"] = "ok" if r["loss_rel_diff_vs_emulation"] <= LOSS_TOLERANCE[precision] else "MISMATCH"


def _gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2 ** 30


def fmt(v, spec: str = ".2f", empty: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    on_cpu = not m["device"].startswith("cuda")
    size = f"{c['size']}^3 voxels" if c.get("spatial_dims") == 3 else f"{c['size']} px"
    memory = (f"- peak memory: {PEAK_RSS_METHOD}; median over the timed steps"
              f"{', every case in a fresh process' if c.get('isolate') else ''}" if on_cpu else
              "- peak memory: max_memory_allocated above the warmed-up baseline (weights and inputs excluded)")
    title = "SparK step timing" if c.get("no_encoder") else "Encoder timing"
    lines = [f"# {title} on {m['device_name']}", "",
             f"- date: {m['date']}", f"- command: `{m['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- git commit: {m['git_commit']}",
             f"- workload: {c['arch']} fwd+bwd, batch {c['batch']}, {size}, "
             f"{'fp32 (no autocast)' if c['precision'] == 'fp32' else c['precision'] + ' autocast'}"
             f"{', channels-last' if c['channels_last'] else ''}; median of {c['iters']} steps after "
             f"{c['warmup']} warm-up steps, {c['rotate']} rotating input sets; "
             f"{'CUDA events' if m['device'].startswith('cuda') else 'host clock (CPU)'}"
             f"{'' if c.get('threads') is None else ', ' + str(c['threads']) + ' torch threads'}",
             memory,
             f"- load average (1, 5, 15 min) at the start {m.get('load_average_start')}, at the end "
             f"{m.get('load_average_end')}", "",
             "| case | backend | mask ratio | visible | median ms | IQR ms | wall ms/step | images/s | peak GiB "
             "| vs dense-nomask | vs emulation | peak vs emulation | loss vs emulation |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r.get("status") != "ok":
            continue
        peak = r.get("peak_mem_bytes")
        check = ""
        if "loss_rel_diff_vs_emulation" in r:
            check = f"{r['loss_rel_diff_vs_emulation']:.1e} {r['loss_check']}"
        lines.append(
            f"| {r['case']} | {r['backend']} | {fmt(r['mask_ratio'], '.2f', '-')} "
            f"| {fmt(r['visible_fraction'], '.2f')} "
            f"| {r['median_ms']:.2f} | {r['q3_ms'] - r['q1_ms']:.2f} | {r['wall_ms_per_step']:.2f} "
            f"| {fmt(r['images_per_s'], '.4g')} | {fmt(None if peak is None else peak / 2 ** 30, '.2f', 'n/a')} "
            f"| {times(r.get('speedup_vs_nomask'))} | {times(r.get('speedup_vs_emulation'))} "
            f"| {fmt(r.get('peak_mem_vs_emulation'), '.2f')} | {check} |")
    # one line per (backend, status, reason): the same reason is not repeated for every ratio
    seen: dict[tuple[str, str, str], list[str]] = {}
    for r in result["results"]:
        if r.get("status") != "ok":
            where = f"{r.get('case', '?')} mask {fmt(r.get('mask_ratio'), '.2f', '-')}"
            seen.setdefault((r["backend"], r["status"], r["reason"]), []).append(where)
    if seen:
        lines += ["", "Not timed:", ""]
        lines += [f"- {backend}, {status} ({'; '.join(wheres)}): {reason}"
                  for (backend, status, reason), wheres in seen.items()]
    if result.get("targets"):
        lines += ["", "## Targets", "", "| backend | baseline | mask ratio | required speed-up | measured | met |",
                  "|---|---|---|---|---|---|"]
        for t in result["targets"]:
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['backend']} | {t['baseline']} | {fmt(t['mask_ratio'], '.2f')} | "
                         f">= {t['required_speedup']:.2f}x | {times(t['measured_speedup']) or '-'} | {met} |")
    if result.get("budgets"):
        lines += ["", "## Absolute goals", "", "| backend | mask ratio | at most ms | measured ms | at most GiB "
                  "| measured GiB | met |", "|---|---|---|---|---|---|---|"]
        for b in result["budgets"]:
            met = "not measured" if b["met"] is None else ("yes" if b["met"] else "**no**")
            lines.append(f"| {b['backend']} | {b['mask_ratio']:.2f} | {b['max_ms']:g} | {fmt(b['measured_ms'])} "
                         f"| {fmt(b['max_gib'], 'g', '-')} | {fmt(b['measured_gib'])} | {met} |")
    if result.get("falls_with_mask") is not None:
        lines += ["", "## The time falls with the mask ratio", ""]
        lines += [f"- {f['backend']}: " + ", ".join(f"mask {k}: {v:.2f} ms" for k, v in f["median_ms_by_ratio"].items())
                  + (" (falls)" if f["met"] else " (**does not fall**)") for f in result["falls_with_mask"]]
        if not result["falls_with_mask"]:
            lines.append("- no packed backend was timed at two mask ratios")
    s = result.get("spark_step")
    if s:
        lines += ["", "## The whole SparK step", "",
                  f"- fastest: {s['best_backend']} with the {s['best_decoder_impl']} decoder, "
                  f"{s['best_median_ms']:.2f} ms, {fmt(s['best_images_per_s'], '.4g')} images/s"
                  + ("" if s["speedup_vs_emulation"] is None else
                     f"; the emulation's step {s['emulation_median_ms']:.2f} ms "
                     f"({fmt(s['emulation_images_per_s'], '.4g')} images/s): {times(s['speedup_vs_emulation'])}"),
                  f"- against SparK's own pre-training (800 ImageNet epochs on 32 A100s in about 48 h, dense "
                  f"emulation: {s['spark_reference_images_per_s']:.0f} images/s per A100): "
                  f"{times(s['vs_spark_reference'])} per card (other card, batch and image source: a reference "
                  f"point, not a like-for-like comparison)",
                  f"- decoder implementations on {s['best_backend']}: " + ", ".join(
                      f"{impl} {ms:.2f} ms" for impl, ms in s["decoder_impls_timed"].items())
                  + f"; fastest: {s['fastest_decoder_impl']}"]
        if s["required_speedup"]:
            met = "not measured" if s["met"] is None else ("yes" if s["met"] else "**no**")
            lines.append(f"- target: at least {s['required_speedup']:.2f}x faster than the emulation's step: {met}")
    auto = result.get("auto")
    if auto:
        lines += ["", f"`--backend auto` picks {auto['picked'] or 'nothing (' + str(auto['error']) + ')'} here; "
                      f"the fastest encoder measured in this run at mask {fmt(auto['mask_ratio'], '.2f')}: "
                      f"{auto['fastest_measured'] or 'none'}"
                      + ("" if auto["agrees"] is None else (" (agrees)" if auto["agrees"] else " (**differs**)"))
                      + ("" if not auto.get("reason") else f"; auto's reason: {auto['reason']}")]
    profiled = [r for r in result["results"] if r.get("status") == "ok" and "kernel_profile" in r]
    if profiled:
        lines += ["", "## Where the time goes", ""]
        for r in profiled:
            what = "" if r.get("case_kind") != "spark" else f"SparK step, {r.get('decoder_impl')} decoder, "
            lines += profile_markdown(f"{what}{r['backend']}, mask {fmt(r['mask_ratio'], '.2f', '-')}",
                                      r["kernel_profile"])
    return "\n".join(lines) + "\n"


def check_targets(rows: list[dict[str, Any]], targets, ratio: float) -> list[dict[str, Any]]:
    """Each target's measured speed-up (baseline median / backend median, encoder case, at ``ratio``;
    the no-mask baseline has no ratio) and whether it is met; None where either was not timed."""
    def median(name):
        want = None if name == NOMASK else ratio
        for r in rows:
            if (r.get("status") == "ok" and r.get("case_kind") == "encoder" and r["backend"] == name
                    and r.get("mask_ratio") == want):
                return r["median_ms"]
        return None

    out = []
    for backend, baseline, required in targets:
        b, t = median(baseline), median(backend)
        measured = None if b is None or t is None or t <= 0 else b / t
        out.append({"backend": backend, "baseline": baseline, "mask_ratio": ratio, "required_speedup": required,
                    "measured_speedup": measured, "met": None if measured is None else measured >= required})
    return out


def check_budgets(rows: list[dict[str, Any]], budgets, ratio: float) -> list[dict[str, Any]]:
    """Each absolute goal (backend, max ms, max GiB or None) against the backend's encoder step at ``ratio``: met,
    missed, or None where it was not timed."""
    out = []
    for backend, max_ms, max_gib in budgets:
        row = next((r for r in rows if r.get("status") == "ok" and r.get("case_kind") == "encoder"
                    and r["backend"] == backend and r.get("mask_ratio") == ratio), None)
        ms = None if row is None else row["median_ms"]
        gib = None if row is None else _gib(row.get("peak_mem_bytes"))
        met = None if ms is None else ms <= max_ms and (max_gib is None or (gib is not None and gib <= max_gib))
        out.append({"backend": backend, "mask_ratio": ratio, "max_ms": max_ms, "measured_ms": ms, "max_gib": max_gib,
                    "measured_gib": gib, "met": met})
    return out


def check_falls_with_mask(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every packed backend timed at two or more mask ratios: whether its encoder step gets faster as the ratio
    grows (the emulation computes every pixel whatever the mask, so it is not held to it)."""
    by_backend: dict[str, dict[float, float]] = {}
    for r in rows:
        if (r.get("status") == "ok" and r.get("case_kind") == "encoder" and r.get("mask_ratio") is not None
                and r["backend"] not in (EMULATION, NOMASK)):
            by_backend.setdefault(r["backend"], {})[r["mask_ratio"]] = r["median_ms"]
    out = []
    for backend, medians in by_backend.items():
        if len(medians) < 2:
            continue
        ordered = [medians[k] for k in sorted(medians)]
        out.append({"backend": backend, "median_ms_by_ratio": {str(k): medians[k] for k in sorted(medians)},
                    "met": all(b < a for a, b in zip(ordered, ordered[1:]))})
    return out


def times(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def write(result, args) -> None:
    from ctssl.atomic import open_atomically

    with open_atomically(args.json) as f:
        json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))


def plan(args, names, decoder_backend: str | None = None):
    """(case_kind, backend, mask ratio, decoder implementation) in the order they are timed: most important
    first. SparK steps: the first decoder implementation on every backend, then the others on
    ``decoder_backend`` (None: nowhere)."""
    jobs = []
    for i, ratio in enumerate([] if args.no_encoder else args.ratios):
        for name in names:
            if name == NOMASK:
                if i == 0:
                    jobs.append(("encoder", name, None, None))
            else:
                jobs.append(("encoder", name, ratio, None))
    if args.spark:
        jobs += [("spark", name, args.ratios[0], args.impls[0]) for name in names if name != NOMASK]
        if decoder_backend is not None:
            jobs += [("spark", decoder_backend, args.ratios[0], impl) for impl in args.impls[1:]]
    return jobs


def auto_pick(device: torch.device, ops) -> tuple[str | None, str | None, dict | None]:
    """What ``--backend auto`` picks on ``device`` for an encoder with ``ops`` (its self-checks and timing run now
    unless cached): (name, None, the pick with its candidates, measured times and reason) or (None, why not, None)."""
    from ctssl.sparse.backends import explain_auto
    try:
        explained = explain_auto(device, ops=ops)
        return explained.backend.name, None, explained.as_dict()
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        return None, f"{type(exc).__name__}: {exc}", None


def auto_record(rows: list[dict[str, Any]], picked: str | None, error: str | None, explained: dict | None,
                ratio: float) -> dict[str, Any]:
    """What ``auto`` picked (and why: ``explained``) beside the fastest masked encoder this run measured at
    ``ratio`` (the emulation and the unmasked baseline are not candidates)."""
    timed = [r for r in rows if r.get("status") == "ok" and r.get("case_kind") == "encoder"
             and r.get("mask_ratio") == ratio and r["backend"] not in (EMULATION, NOMASK)]
    fastest = min(timed, key=lambda r: r["median_ms"])["backend"] if timed else None
    return {"picked": picked, "error": error, "mask_ratio": ratio, "fastest_measured": fastest,
            "agrees": None if picked is None or fastest is None else picked == fastest,
            "reason": None if explained is None else explained["reason"], "explained": explained}


def spark_summary(rows: list[dict[str, Any]], baseline_impl: str, required: float) -> dict[str, Any] | None:
    """The whole SparK step: the fastest one against the emulation's (``baseline_impl`` decoder) and against
    SparK's own pre-training throughput; the fastest decoder implementation; the ``required`` speed-up (0: none)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("case_kind") == "spark"]
    emulation = next((r for r in ok if r["backend"] == EMULATION and r.get("decoder_impl") == baseline_impl), None)
    packed = [r for r in ok if r["backend"] != EMULATION]
    if not packed:
        return None
    best = min(packed, key=lambda r: r["median_ms"])
    impls = [r for r in packed if r["backend"] == best["backend"]]
    fastest_impl = min(impls, key=lambda r: r["median_ms"])
    speedup = None if emulation is None else emulation["median_ms"] / best["median_ms"]
    return {"best_backend": best["backend"], "best_decoder_impl": best.get("decoder_impl"),
            "best_median_ms": best["median_ms"], "best_images_per_s": best["images_per_s"],
            "emulation_median_ms": None if emulation is None else emulation["median_ms"],
            "emulation_images_per_s": None if emulation is None else emulation["images_per_s"],
            "speedup_vs_emulation": speedup,
            "vs_spark_reference": (None if best["images_per_s"] is None
                                   else best["images_per_s"] / SPARK_REFERENCE_IMAGES_PER_S),
            "spark_reference_images_per_s": SPARK_REFERENCE_IMAGES_PER_S,
            "fastest_decoder_impl": fastest_impl.get("decoder_impl"),
            "decoder_impls_timed": {r.get("decoder_impl"): r["median_ms"] for r in impls},
            "required_speedup": required or None,
            "met": None if not required or speedup is None else speedup >= required}


def run_isolated(args, name: str, ratio: float | None) -> dict[str, Any]:
    """One encoder case timed by this script in a fresh Python process (its own allocator state and caches)."""
    child = ["--arch", args.arch, "--batch", str(args.batch), "--size", str(args.size),
             "--mask-ratios", str(args.ratios[0] if ratio is None else ratio), "--backends", name,
             "--precision", args.precision, "--warmup", str(args.warmup), "--iters", str(args.iters),
             "--rotate", str(args.rotate), "--device", args.device, "--profile-kernels", str(args.profile_kernels),
             "--profile-steps", str(args.profile_steps)]
    if args.threads is not None:
        child += ["--threads", str(args.threads)]
    if args.channels_last:
        child.append("--channels-last")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--json", out],
                              capture_output=True, text=True)
        if not os.path.exists(out):
            return {"status": "error", "reason": f"isolated case exited with {proc.returncode}: {proc.stderr[-2000:]}"}
        with open(out) as f:
            rows = [r for r in json.load(f)["results"] if r["backend"] == name]
    return rows[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_model_cases import encoder_workload, spark_workload

    profile = make_profile(args)
    names = pick_backends(args.backends)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    dims, ops = encoder_facts(args.arch)
    threads = args.threads if args.threads is not None else (1 if profile.device.type == "cpu" else None)
    result = {"format": FORMAT, "machine": machine_block(profile),
              "config": {"arch": args.arch, "batch": args.batch, "size": args.size, "spatial_dims": dims,
                         "precision": args.precision, "channels_last": args.channels_last, "warmup": args.warmup,
                         "iters": args.iters, "rotate": args.rotate, "mask_ratios": args.ratios,
                         "decoder_width": args.decoder_width, "threads": threads, "isolate": args.isolate,
                         "decoder_impls": args.impls if args.spark else None, "no_encoder": args.no_encoder},
              "results": []}
    print(f"encoder_timing: {result['machine']['device_name']}, {args.arch} batch {args.batch} @ {args.size}"
          f"{'^3' if dims == 3 else 'px'}, {args.precision}, backends {', '.join(names)}", flush=True)
    start = time.monotonic()
    from ctssl.sparse import get_backend
    pick = None  # auto's (name, error, explanation), asked once
    decoder_backend = None
    if args.spark and len(args.impls) > 1:
        decoder_backend = args.decoder_backend
        if decoder_backend == "auto":
            pick = auto_pick(profile.device, ops)
            decoder_backend = pick[0]
        result["config"]["decoder_backend"] = decoder_backend
        if decoder_backend is None:
            result["results"] += [{"case_kind": "spark", "backend": "auto", "mask_ratio": args.ratios[0],
                                   "decoder_impl": impl, "case": f"SparK step ({args.arch}, {impl} decoder)",
                                   "status": "skipped", "reason": f"auto picks no backend: {pick[1]}"}
                                  for impl in args.impls[1:]]
    for kind, name, ratio, impl in plan(args, names, decoder_backend):
        base = {"case_kind": kind, "backend": name, "mask_ratio": ratio,
                "case": f"{args.arch} encoder fwdbwd" if kind == "encoder"
                else f"SparK step ({args.arch}, decoder {args.decoder_width}, {impl})"}
        if kind == "spark":
            base["decoder_impl"] = impl
        reason = why_not(name, profile.device, ops)
        if reason is None and kind == "spark":
            try:
                importlib.import_module("ctssl.ssl")
            except ImportError as exc:
                reason = f"ctssl.ssl not importable: {exc}"
        if reason is None and args.deadline_s and time.monotonic() - start > args.deadline_s:
            reason = f"deadline of {args.deadline_s:.0f}s reached before this configuration"
        if reason is not None:
            result["results"].append({**base, "status": "skipped", "reason": reason})
            print(f"  skip {kind} {name} mask {ratio}: {reason}", flush=True)
            write(result, args)
            continue
        backend = None if name == NOMASK else get_backend(name, profile.device)
        if kind == "encoder":
            def build():
                return encoder_workload(profile, backend, ratio)
        else:
            def build():
                return spark_workload(profile, backend, ratio, impl)
        t0 = time.monotonic()
        try:
            # kernel profiles: every encoder at the first ratio; SparK steps on the decoder backend (each decoder)
            kernels = args.profile_kernels > 0 and (kind == "encoder" and ratio in (None, args.ratios[0])
                                                    or kind == "spark" and name == decoder_backend)
            if args.isolate:
                row = {**base, **run_isolated(args, name, ratio)}
                if row.get("status") != "ok":
                    raise RuntimeError(row.get("reason", "the isolated case failed"))
            else:
                row = {**base, **time_one(build, args, profile, kernels)}
            print(f"  {kind:7s} {name:12s} mask {fmt(ratio, '.2f', '-'):>4s}: median {row['median_ms']:8.2f} ms, "
                  f"peak {fmt(_gib(row['peak_mem_bytes']), '.2f', 'n/a')}"
                  f" GiB, loss {row['loss']:.5g} ({time.monotonic() - t0:.0f}s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not end the whole run
            row = {**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=8)}
            print(f"  ERROR {kind} {name} mask {ratio}: {type(exc).__name__}: {exc}", flush=True)
        result["results"].append(row)
        add_comparisons(result["results"], args.precision, args.impls[0])
        write(result, args)
        gc.collect()
        if profile.device.type == "cuda":
            torch.cuda.empty_cache()
    add_comparisons(result["results"], args.precision, args.impls[0])
    result["machine"]["load_average_end"] = load_average()
    if args.targets:
        result["targets"] = check_targets(result["results"], args.targets, args.ratios[0])
    if args.budgets:
        result["budgets"] = check_budgets(result["results"], args.budgets, args.ratios[0])
    if args.falls_with_mask:
        result["falls_with_mask"] = check_falls_with_mask(result["results"])
    if args.spark:
        result["spark_step"] = spark_summary(result["results"], args.impls[0], args.spark_target)
    if not args.no_encoder:
        result["auto"] = auto_record(result["results"], *(pick or auto_pick(profile.device, ops)), args.ratios[0])
    write(result, args)
    print(markdown(result), flush=True)
    bad = [r for r in result["results"] if r.get("status") == "error" or r.get("loss_check") == "MISMATCH"
           or (r.get("status") == "ok" and not r.get("loss_finite", True))]
    if bad:
        return 1
    goals = [*result.get("targets", []), *result.get("budgets", []), *(result.get("falls_with_mask") or []),
             result.get("spark_step") or {}]
    missed = any(g.get("met") is False for g in goals)
    return 3 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
