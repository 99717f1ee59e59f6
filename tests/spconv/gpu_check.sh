#!/usr/bin/env bash
# Prepared GPU check of the spconv backend: forward and backward against dense, fp32/fp16/bf16,
# single layers and ResNet-18, for every spconv that can serve the GPU there.
#
# The GPU machine has no network. Bring spconv-triton's pure-Python wheel along: on the
# development machine `pip download spconv-triton==1.0.0 --no-deps -d wheels/` (about 70 kB),
# then run from the repository root there:  bash tests/spconv/gpu_check.sh wheels
# (spconv's own CUDA wheels, spconv-cu126 + cumm-cu126, are built per Python version and
# about 100 MB: install them there only if they are already present.)
set -euo pipefail
WHEELS="${1:-wheels}"
if ! python -c "import spconv_triton" 2>/dev/null; then
    python -m pip install --no-index --no-deps --find-links "$WHEELS" spconv-triton
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python -m pytest tests/spconv -q -rs -m gpu -p no:cacheprovider "${@:2}"
