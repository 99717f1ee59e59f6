#!/usr/bin/env bash
# Build ctssl._C on a GPU machine and run the cuda backend's tests there (CPU loops + GPU kernels).
# Usage (repository root): bash tests/cuda/run_gpu_checks.sh   [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s)
log="${OUT:-/tmp}/ctssl_build_ext.log"
python setup.py build_ext --inplace >"$log" 2>&1 || { tail -50 "$log"; exit 1; }
echo "build_ext: $(( $(date +%s) - start )) s"
python -m pytest tests/cuda -q -rs "$@"
