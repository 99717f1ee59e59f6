#!/usr/bin/env bash
# Create ./.venv with ctssl and everything its tests need, from scratch (idempotent).
# Installs the CUDA build of torch; with nvcc present (CUDA_HOME, default
# /usr/local/cuda) the CUDA extension in csrc/ is compiled too, even without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
pip install -q "torch==${CTSSL_TORCH:-2.14.1}" "torchvision==${CTSSL_TORCHVISION:-0.29.1}"
pip install -q ninja numpy
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
if ! pip install -v --no-build-isolation -e ".[test,spconv,nifti]" > .venv/ctssl-install.log 2>&1; then
    tail -60 .venv/ctssl-install.log >&2
    echo "setup.sh: installing ctssl failed (full log: .venv/ctssl-install.log)" >&2
    exit 1
fi
grep -E "^ctssl:" .venv/ctssl-install.log || true
echo "setup.sh: ctssl installed in $(( $(date +%s) - start )) s; backends:"
ctssl-backends
