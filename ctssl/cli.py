"""Console entry points. Each one imports its subsystem lazily so `--help` is fast."""
from __future__ import annotations

import sys


def _run(module: str, argv=None) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def train(argv=None) -> int:
    """ctssl-train: SparK or contrastive pre-training."""
    return _run("ctssl.train.pretrain_cli", argv)


def finetune(argv=None) -> int:
    """ctssl-finetune: fine-tune or linear-probe a backbone on a labeled set."""
    return _run("ctssl.train.finetune_cli", argv)


def sweep(argv=None) -> int:
    """ctssl-sweep: methods x label fractions x seeds, resumable, with the report."""
    return _run("ctssl.train.sweep", argv)


def study(argv=None) -> int:
    """ctssl-study: the whole few-label study end to end (data, pre-training, sweep, report)."""
    return _run("ctssl.train.study", argv)


def prepare(argv=None) -> int:
    """ctssl-prepare: DICOM tree -> prepared slice store."""
    return _run("ctssl.data.prepare", argv)


def phantoms(argv=None) -> int:
    """ctssl-phantoms: write the built-in synthetic CT set as DICOM."""
    return _run("ctssl.data.phantom", argv)


def demo(argv=None) -> int:
    """ctssl-demo: masked ResNet forward on every usable backend, checked against dense."""
    return _run("ctssl.demo", argv)


def backends(argv=None) -> int:
    """ctssl-backends: every backend, whether it is usable here and what it can do, and what ``auto`` picks."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ctssl-backends",
        description="List ctssl's sparse-engine backends: usable here or why not (and what to install), what a "
                    "usable one cannot do on this machine (e.g. train), and which backend `--backend auto` "
                    "picks on the CPU and, when one is visible, on the GPU.")
    parser.add_argument("--check", action="store_true",
                        help="run the self-check of every usable backend on every device here (a masked conv, "
                             "BatchNorm and max pool, forward and backward, against the dense reference) and print "
                             "pass/fail and its time; exit 1 if any fails. Then time a masked training step of every "
                             "backend `auto` can choose from on each device and print the times it ranks them by. "
                             "Verdicts and times are cached for `auto`, which otherwise checks a custom backend and "
                             "times the candidates on its first use of a device")
    args = parser.parse_args(argv)

    import torch

    from ctssl.sparse import backend_status, get_backend, self_check
    from ctssl.sparse.backends import explain_auto
    from ctssl.sparse.backends.base import CONVNEXT_OPS

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    status = backend_status()
    for name, reason in status.items():
        if reason is not None:
            print(f"{name:10s} unavailable: {reason}")
            continue
        limits = [f"cannot train on {d.type}: {why}" for d in devices
                  if (why := get_backend(name).training_unsupported_reason(d))]
        print(f"{name:10s} available" + "".join(f"; {limit}" for limit in limits))
    failures = 0
    if args.check:
        for name in (n for n, reason in status.items() if reason is None):
            backend = get_backend(name)
            for device in devices:
                try:
                    backend.check_device(device)
                except ValueError as exc:  # (BackendUnavailableError too) this backend does not run there
                    print(f"check {name:10s} {_device_label(device)}: not run ({exc})")
                    continue
                verdict = self_check.run_self_check(backend, device)
                self_check.record(backend, device, verdict)
                failures += not verdict.ok
                print(f"check {name:10s} {_device_label(device)}: {'pass' if verdict.ok else 'FAIL'}"
                      f"{' (forward only)' if verdict.forward_only else ''} in {verdict.seconds:.2f} s"
                      + (f": {verdict.error}" if verdict.error else ""))
    picks, convnext_picks = [], []
    for device in devices:
        pick = explain_auto(device, check=args.check, fresh=args.check)
        picks.append(_pick_line(device, pick, args.check))
        if device.type == "cuda":  # the CPU has one candidate whatever the model
            convnext_picks.append(_pick_line(device, explain_auto(device, check=args.check, ops=CONVNEXT_OPS,
                                                                  fresh=args.check), args.check))
    if len(devices) == 1:
        picks.append("cuda -> (no GPU visible)")
    if convnext_picks:
        print("auto picks for ConvNeXt: " + "; ".join(convnext_picks))
    print("auto picks: " + "; ".join(picks))
    return 1 if failures else 0


def _pick_line(device, pick, checked: bool) -> str:
    """``cuda -> triton (self-check passed; measured on NVIDIA H200: triton 1.23 ms, ...)``; with ``checked``
    (the times were just measured) a ``time`` line per candidate is printed first."""
    from ctssl.sparse import self_check

    if checked and pick.ranking is not None:
        for name, ms in pick.ranking.times_ms.items():
            print(f"time  {name:10s} {_device_label(device)}, {pick.ranking.family} step: {ms:.3g} ms")
        for name, error in pick.ranking.errors.items():
            print(f"time  {name:10s} {_device_label(device)}, {pick.ranking.family} step: FAIL: {error}")
    notes = []
    if pick.backend.self_check_before_auto:
        notes.append("self-check passed" if self_check.cached_verdict(pick.backend, device) is not None else
                     "not self-checked yet: its first use runs the check, --check runs it now")
    notes.append(pick.reason())
    return f"{device.type} -> {pick.backend.name} ({'; '.join(notes)})"


def _device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train())
