#!/usr/bin/env bash
# Fetch, on this (online) machine, the wheels the offline GPU machine needs for the spconv backend:
# spconv-triton (pure Python on Triton, 69 kB). The CUDA wheels of spconv (spconv-cu126 is 70 MB,
# plus cumm) exceed the device tool's 64 MiB carry limit, so the GPU run uses spconv-triton.
#
#   bash scripts/fetch_gpu_wheels.sh        # writes .whl/ (git-ignored)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# gpu_check.sh installs every wheel in .whl/ with --no-deps into a side directory on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl "spconv-triton==1.0.0"
ls -la .whl
