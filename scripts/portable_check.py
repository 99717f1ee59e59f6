"""Run tests under other CPU math kernels, thread counts and oneDNN on/off; print each test's outcome
and the margins it records (``record_property``), so a test that passes here only by one CPU's
rounding shows up before another machine fails it.

    python scripts/portable_check.py tests/train/test_pretrain_methods.py -k fixed_batch
    python scripts/portable_check.py --quick tests/ssl/test_methods.py   # native / default ISA only

Each configuration is one pytest process with:
- ISA level ``native`` (unset), ``avx2`` or ``default``: ATEN_CPU_CAPABILITY (ATen's vectorized kernels),
  ONEDNN_MAX_CPU_ISA (oneDNN's convolutions) and MKL_ENABLE_INSTRUCTIONS (MKL's GEMMs) together, the way
  a CPU without AVX-512 (or without AVX) would pick them;
- oneDNN on or off (CTSSL_TEST_MKLDNN=0: tests/conftest.py sets torch.backends.mkldnn.enabled = False);
- 1 or 2 intra-op threads (CTSSL_TEST_THREADS: the tests' single-thread fixtures use it).
Extra arguments go to pytest. Exit code 1 when any configuration has a failing test.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ISA = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
ROOT = Path(__file__).resolve().parents[1]


def run_one(pytest_args: list[str], isa: str, mkldnn: bool, threads: int) -> tuple[dict, float]:
    env = {**os.environ, **ISA[isa], "CTSSL_TEST_MKLDNN": "1" if mkldnn else "0", "CTSSL_TEST_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        "-o", "junit_family=xunit1", *pytest_args], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        results = {}
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = case.get("name")
                failed = case.find("failure") is not None or case.find("error") is not None
                skipped = case.find("skipped") is not None
                props = {p.get("name"): p.get("value") for p in case.iter("property")}
                results[name] = ("FAIL" if failed else "skip" if skipped else "pass", props)
    return results, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only native and default ISA, oneDNN on, 1 thread")
    args, pytest_args = parser.parse_known_args(argv)
    configs = ([("native", True, 1), ("default", True, 1)] if args.quick
               else list(itertools.product(ISA, (True, False), (1, 2))))
    failures = 0
    print("| ISA | oneDNN | threads | test | outcome | recorded | s |\n|---|---|---|---|---|---|---|")
    for isa, mkldnn, threads in configs:
        results, seconds = run_one(pytest_args, isa, mkldnn, threads)
        if not results:
            print(f"| {isa} | {'on' if mkldnn else 'off'} | {threads} | (pytest produced no report) | FAIL | | |")
            failures += 1
        for name, (outcome, props) in sorted(results.items()):
            failures += outcome == "FAIL"
            recorded = ", ".join(f"{k} {v}" for k, v in props.items())
            print(f"| {isa} | {'on' if mkldnn else 'off'} | {threads} | {name} | {outcome} | {recorded} | "
                  f"{seconds:.0f} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
