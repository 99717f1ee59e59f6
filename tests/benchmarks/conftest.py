"""Tests of the benchmark tools themselves (the benchmark bodies run in their own invocation: `pytest benchmarks`).

The tools import each other by module name (``bench_config``, ``encoder_timing``, ...), as they do when
run from ``benchmarks/``: put that folder on the import path.
"""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
