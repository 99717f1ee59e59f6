#!/usr/bin/env bash
# The one prepared check for a lent H100/H200: build, test, time, sanitize. At most 8.5 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   CTSSL_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # CPU rehearsal of the pipeline, tiny sizes
#   CTSSL_GPU_CHECK_ONLY="spark convnext" bash benchmarks/gpu_check.sh   # only these stages (env and build
#                                           # always run; the other stages are listed as not selected)
#   CTSSL_GPU_CHECK_ONLY=rerun bash benchmarks/gpu_check.sh   # on the same (warm) machine: only the stages
#                                           # the last run left undone (failed, timed out, budget spent)
#
# Stages (each under its own `timeout`, all inside CTSSL_GPU_CHECK_BUDGET_S, default 480 s; give the
# device call timeout_s=540):
#   env        nvidia-smi, python/torch/triton/nvcc versions, git commit
#   wheels     pip install --target of any wheels carried in .whl/ (spconv-triton, say)
#   build      pip install --no-build-isolation --no-deps -e . (CUDA_HOME, TORCH_CUDA_ARCH_LIST=9.0)
#   tests      pytest -m gpu tests/, then tests/triton (every GPU kernel against its reference)
#   timing     benchmarks/encoder_timing.py: ResNet-50 fwd+bwd, batch 128, 224 px, bf16 autocast,
#              channels-last, mask ratios 0.6/0.3/0.9, every available backend + dense emulation +
#              plain dense (no mask), CUDA events, peak memory, the top kernels of each backend at
#              mask 0.6 (torch.profiler); goals: triton <= 10 ms and <= 2.5 GiB, cuda <= 12 ms at mask 0.6, and
#              every packed backend faster at a higher mask ratio (exit code 3 when one is missed)
#   spark      the whole SparK step (ResNet-50, decoder 768, AdamW) per backend and the emulation, then the
#              decoder alternatives (channels-last, subpixel, compiled, all three) on auto's pick; target: the
#              fastest step at least 4x faster than the emulation's; images/s against SparK's 185/s per A100
#   sanitizer  compute-sanitizer memcheck on the cuda backend's GPU op tests (if ctssl._C was built)
#   timing3d   the same for volumes: ResNet-18-3D fwd+bwd, batch 8, 128^3 crops, mask ratio 0.6, bf16
#              autocast, channels-last-3d, every backend that takes volumes (the others are listed as skipped)
#   convnext   the same for ConvNeXt-S at mask 0.6 (plain dense, emulation, torch, triton, cuda) and issue 16's
#              target: triton at most half the plain dense (cuDNN) time (encoder_timing --target)
#   ops        pytest-benchmark op suite, 3x3 convs in bf16 at mask 0.6 (whatever budget is left)
# The device returns at most 8 files from $OUT, so $OUT (default ./out) gets three: gpu_check.log,
# summary.md (card, date, command, versions, stage results, every figure) and gpu_check_results.tar.gz,
# repacked after every stage (a run cut short keeps what it measured) from a work folder outside $OUT:
# summary.md, the log, encoder_timing.json/.md, spark_step.json/.md, encoder_timing_3d.json/.md,
# convnext_timing.json/.md, gpu_tests.xml, triton_tests.xml, ops_bench.json.
# Unpack it into benchmarks/results/<date>-<card>/ and commit (the command is printed at the end).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES=$(mktemp -d "${TMPDIR:-/tmp}/ctssl_gpu_check.XXXXXX")
TARBALL=gpu_check_results.tar.gz
BUDGET_S=${CTSSL_GPU_CHECK_BUDGET_S:-480}
SMOKE=${CTSSL_GPU_CHECK_SMOKE:-0}
ONLY=${CTSSL_GPU_CHECK_ONLY:-}
# what a run left undone, kept outside $OUT (emptied before every device command) for CTSSL_GPU_CHECK_ONLY=rerun
RERUN_FILE=${CTSSL_GPU_CHECK_RERUN_FILE:-${TMPDIR:-/tmp}/ctssl_gpu_check_rerun}
UNDONE=()
if [[ "$ONLY" == rerun ]]; then
  if [[ ! -e "$RERUN_FILE" ]]; then
    ONLY=""
    echo "gpu_check: rerun: no record of a previous run on this machine, so everything runs"
  else
    ONLY=$(echo $(cat "$RERUN_FILE"))
    if [[ -z "$ONLY" ]]; then echo "gpu_check: rerun: the last run left nothing undone"; exit 0; fi
    echo "gpu_check: rerun of: $ONLY"
  fi
fi
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ "$SMOKE" == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

T0=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STATUS_ROWS=()
remaining() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# pack: the work folder as one tarball in $OUT, replaced atomically (a kill mid-write leaves the previous one)
pack() { tar -czf "$OUT/.$TARBALL.tmp" -C "$RES" . && mv -f "$OUT/.$TARBALL.tmp" "$OUT/$TARBALL"; }

# stage NAME CAP_SECONDS "COMMAND": run under timeout min(CAP, budget left); record rc and time.
stage() {
  local name=$1 cap=$2 cmd=$3 left limit start rc dt what
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* && " env wheels build " != *" $name "* ]]; then
    echo "=== $name: not selected (CTSSL_GPU_CHECK_ONLY=$ONLY)"
    STATUS_ROWS+=("| $name | not selected | 0 |")
    return 0
  fi
  left=$(remaining)
  limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    echo "=== $name: skipped, the ${BUDGET_S}s budget is spent"
    STATUS_ROWS+=("| $name | skipped: budget spent | 0 |")
    UNDONE+=("$name")
    return 0
  fi
  echo
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S)): $cmd"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $cmd"
  rc=$?
  dt=$(( $(date +%s) - start ))
  what="rc $rc"
  # rc 3: the stage ran and a goal was missed, a result a rerun would not change; anything else non-zero is undone
  if (( rc != 0 && rc != 3 )); then UNDONE+=("$name"); fi
  if (( rc == 124 || rc == 137 )); then what="TIMEOUT after ${limit}s"; fi
  echo "=== $name: $what in ${dt}s"
  STATUS_ROWS+=("| $name | $what | $dt |")
  pack
}

note() { echo "=== $1"; STATUS_ROWS+=("| $2 | $3 | 0 |"); }

if [[ "$SMOKE" == 1 ]]; then
  echo "gpu_check: SMOKE rehearsal on the CPU (tiny sizes; no build, no sanitizer; figures mean nothing)"
  export CTSSL_BENCH_DEVICE=cpu
  CARD="cpu-smoke"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA GPU here; run this on the GPU machine (or CTSSL_GPU_CHECK_SMOKE=1 to rehearse)"
  exit 2
else
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
fi
CARD_SLUG=$(echo "${CARD:-unknown}" | tr ' ' '-' | tr -cd 'A-Za-z0-9-')
GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
export CTSSL_GIT_COMMIT=$GIT_COMMIT
echo "gpu_check: card ${CARD:-unknown}, commit $GIT_COMMIT, budget ${BUDGET_S}s, out $OUT (work folder $RES), python $PY"

# --- env ---------------------------------------------------------------------
stage env 40 "nvidia-smi || true; $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; $PY -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: not importable'; (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | tail -2; compute-sanitizer --version 2>/dev/null | head -2 || true; $PY -m pip --version"

# --- wheels carried along (e.g. spconv-triton for the spconv backend): run with carry [".whl"] --
if compgen -G ".whl/*.whl" >/dev/null; then
  stage wheels 60 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ctssl_site .whl/*.whl"
  export PYTHONPATH="/tmp/ctssl_site${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- build -------------------------------------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  note "build: skipped in smoke mode (using the installed ctssl)" build "skipped (smoke)"
else
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-16}
  stage build 200 "$PY -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -40"
fi
if ! "$PY" -c "import ctssl" 2>/dev/null; then
  echo "=== ctssl is not importable after the build: falling back to PYTHONPATH=$PWD (kernels/ and the CUDA extension may be missing)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# ctssl-backends --check: every usable backend's self-check (masked conv, BN, pool, fwd+bwd vs dense) on
# the CPU and the GPU, pass/fail and time, and what auto picks (compiles the kernels the tests reuse)
stage backends 90 "$PY -c 'import sys; from ctssl.cli import backends; sys.exit(backends([\"--check\"]))'"

# --- correctness -------------------------------------------------------------
# the GPU-marked tests everywhere, then the Triton kernel tests (unmarked: on a CPU they run in the
# interpreter, here natively); the stage fails if either fails. The ahead-of-time compile check
# is left out: it is the no-GPU stand-in for what this stage runs for real
TRITON_TESTS=tests/triton
[[ "$SMOKE" == 1 ]] && TRITON_TESTS=none  # on a CPU they would run in the (slow) interpreter
stage tests 150 "$PY -m pytest -m gpu tests/ -q -ra -p no:cacheprovider --continue-on-collection-errors --junitxml=$RES/gpu_tests.xml; a=\$?; if [ -d $TRITON_TESTS ]; then $PY -m pytest $TRITON_TESTS --ignore=$TRITON_TESTS/test_compile_for_gpu.py -q -ra -p no:cacheprovider --junitxml=$RES/triton_tests.xml; b=\$?; else b=0; fi; exit \$(( a > b ? a : b ))"

# --- timing (the headline figures) -------------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  TIMING_ARGS="--device cpu --arch resnet18 --batch 2 --size 64 --mask-ratios 0.5 --precision fp32 --warmup 1 --iters 2 --rotate 1 --decoder-width 96 --profile-kernels 8 --profile-steps 1"
else
  TIMING_ARGS="--device cuda --arch resnet50 --batch 128 --size 224 --mask-ratios 0.6,0.3,0.9 --precision bf16 --channels-last --warmup 5 --iters 20 --rotate 3 --decoder-width 768 --profile-kernels 15"
fi
TIMING_CAP=170
TIMING_DEADLINE=$(( $(remaining) < TIMING_CAP ? $(remaining) : TIMING_CAP ))
TIMING_DEADLINE=$(( TIMING_DEADLINE > 60 ? TIMING_DEADLINE - 45 : 15 ))
TIMING_GOALS="--falls-with-mask"
[[ "$SMOKE" == 1 ]] || TIMING_GOALS="--budget triton:10:2.5 --budget cuda:12 --falls-with-mask"
stage timing $TIMING_CAP "$PY benchmarks/encoder_timing.py $TIMING_ARGS $TIMING_GOALS --deadline-s $TIMING_DEADLINE --json $RES/encoder_timing.json --markdown $RES/encoder_timing.md"

# --- the whole SparK step (issue 13, items 3 and 4): backends, then the decoder alternatives --------
if [[ "$SMOKE" == 1 ]]; then
  SPARK_ARGS="--device cpu --arch resnet18 --batch 2 --size 64 --mask-ratios 0.6 --precision fp32 --warmup 1 --iters 2 --rotate 1 --decoder-width 96 --profile-kernels 4 --profile-steps 1 --backends dense,torch --decoder-impls eager,subpixel,channels-last"
else
  SPARK_ARGS="--device cuda --arch resnet50 --batch 128 --size 224 --mask-ratios 0.6 --precision bf16 --channels-last --warmup 3 --iters 10 --rotate 2 --decoder-width 768 --profile-kernels 12 --profile-steps 2 --decoder-impls eager,channels-last,subpixel,compiled,compiled+subpixel+channels-last"
fi
SPARK_CAP=150
stage spark $SPARK_CAP "$PY benchmarks/encoder_timing.py $SPARK_ARGS --spark --no-encoder --spark-target 4 --deadline-s $(( SPARK_CAP - 40 )) --json $RES/spark_step.json --markdown $RES/spark_step.md"

# --- memory checking of the CUDA kernels ---------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  note "sanitizer: skipped in smoke mode" sanitizer "skipped (smoke)"
elif ! command -v compute-sanitizer >/dev/null 2>&1 && [[ ! -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  note "sanitizer: compute-sanitizer not found" sanitizer "skipped: compute-sanitizer not found"
elif ! "$PY" -c "import ctssl._C" 2>/dev/null; then
  note "sanitizer: skipped, ctssl._C (the cuda backend's extension) was not built" sanitizer "skipped: no ctssl._C"
else
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  SAN_TESTS=tests/cuda/test_gpu.py
  [[ -f $SAN_TESTS ]] || SAN_TESTS=tests/
  stage sanitizer 120 "$SAN --tool memcheck --error-exitcode 99 --print-limit 30 $PY -m pytest -m gpu $SAN_TESTS -q -x -p no:cacheprovider -k 'not resnet50 and not graph'"
fi

# --- volumes (issue 17): the 3-D encoder on every backend that takes volumes -------------
if [[ "$SMOKE" == 1 ]]; then
  TIMING3D_ARGS="--device cpu --arch resnet18_3d --batch 1 --size 64 --mask-ratios 0.6 --precision fp32 --warmup 1 --iters 2 --rotate 1"
else
  TIMING3D_ARGS="--device cuda --arch resnet18_3d --batch 8 --size 128 --mask-ratios 0.6 --precision bf16 --channels-last --warmup 3 --iters 10 --rotate 2"
fi
TIMING3D_CAP=75
stage timing3d $TIMING3D_CAP "$PY benchmarks/encoder_timing.py $TIMING3D_ARGS --deadline-s $(( TIMING3D_CAP - 25 )) --json $RES/encoder_timing_3d.json --markdown $RES/encoder_timing_3d.md"
# --- ConvNeXt-S (issue 16): triton at most half the dense cuDNN time at mask 0.6 --------
if [[ "$SMOKE" == 1 ]]; then
  CNX_ARGS="--device cpu --arch convnext_tiny --batch 2 --size 64 --mask-ratios 0.6 --precision fp32 --warmup 1 --iters 2 --rotate 1 --backends dense-nomask,dense,torch"
else
  CNX_ARGS="--device cuda --arch convnext_small --batch 128 --size 224 --mask-ratios 0.6 --precision bf16 --channels-last --warmup 5 --iters 10 --rotate 2 --backends dense-nomask,dense,torch,triton,cuda"
fi
CNX_CAP=100
stage convnext $CNX_CAP "$PY benchmarks/encoder_timing.py $CNX_ARGS --target triton:dense-nomask:2 --deadline-s $(( CNX_CAP - 30 )) --json $RES/convnext_timing.json --markdown $RES/convnext_timing.md"

# --- op benchmarks with what is left -------------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  OPS_K="conv3x3s1-c64 and float32 and (m0.5 or nomask)"
else
  OPS_K="conv3x3 and bfloat16 and (m0.6 or nomask)"
fi
stage ops 110 "$PY -m pytest benchmarks/test_bench_ops.py --benchmark-only -q -p no:cacheprovider -k '$OPS_K' --benchmark-json $RES/ops_bench.json"

# --- summary -----------------------------------------------------------------
SUMMARY=$RES/summary.md
{
  echo "# ctssl gpu_check on ${CARD:-unknown}"
  echo
  echo "- date: $STARTED (UTC), total $(( $(date +%s) - T0 ))s"
  echo "- command: \`bash benchmarks/gpu_check.sh\` (CTSSL_GPU_CHECK_BUDGET_S=$BUDGET_S$([[ $SMOKE == 1 ]] && echo ', SMOKE rehearsal on CPU: figures mean nothing'))"
  echo "- git commit: $GIT_COMMIT"
  echo "- versions: $("$PY" -c 'import sys, torch
try:
    import triton; t = triton.__version__
except Exception:
    t = "n/a"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}")' 2>/dev/null)"
  echo "- TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}, CUDA_HOME=${CUDA_HOME:-unset}"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS_ROWS[@]}"
  echo
  if [[ -f $RES/encoder_timing.md ]]; then sed 's/^# /## /' "$RES/encoder_timing.md"; else echo "(no encoder timing results)"; fi
  echo
  if [[ -f $RES/spark_step.md ]]; then sed 's/^#/##/' "$RES/spark_step.md"; else echo "(no SparK step results)"; fi
  echo
  if [[ -f $RES/encoder_timing_3d.md ]]; then sed 's/^# /## Volumes: /' "$RES/encoder_timing_3d.md"; else echo "(no 3-D encoder timing results)"; fi
  if [[ -f $RES/convnext_timing.md ]]; then sed 's/^#/##/' "$RES/convnext_timing.md"; else echo "(no ConvNeXt timing results)"; fi
  echo
  if [[ -f $RES/ops_bench.json ]]; then
    tmp=$(mktemp -d)
    "$PY" benchmarks/summarize.py "$RES/ops_bench.json" --out "$tmp" --no-plots --title "op benchmarks" >/dev/null \
      && sed 's/^#/##/' "$tmp/summary.md"
    rm -rf "$tmp"
  else
    echo "(no op benchmark results)"
  fi
} > "$SUMMARY" 2>&1

echo
echo "=== stages"
printf '%s\n' "${STATUS_ROWS[@]}"
echo
if [[ -f $RES/encoder_timing.md ]]; then grep '^|' "$RES/encoder_timing.md"; fi
if [[ -f $RES/spark_step.md ]]; then grep '^|\|^- fastest\|^- target\|^- decoder' "$RES/spark_step.md"; fi
if [[ -f $RES/encoder_timing_3d.md ]]; then grep '^|' "$RES/encoder_timing_3d.md"; fi
if [[ -f $RES/convnext_timing.md ]]; then grep '^|' "$RES/convnext_timing.md"; fi
echo
cp "$SUMMARY" "$OUT/summary.md"
echo "${UNDONE[*]:-}" > "$RERUN_FILE"
echo "gpu_check: left undone: ${UNDONE[*]:-nothing}$( ((${#UNDONE[@]})) && echo " (CTSSL_GPU_CHECK_ONLY=rerun repeats them)")"
cp "$OUT/gpu_check.log" "$RES/gpu_check.log"
pack
echo "gpu_check: done in $(( $(date +%s) - T0 ))s; results in $OUT/$TARBALL ($(tar -tzf "$OUT/$TARBALL" | grep -vc '/$') files)"
DEST=benchmarks/results/$(date -u +%Y-%m-%d)-${CARD_SLUG}
echo "gpu_check: unpack and commit: mkdir -p $DEST && tar -xzf <files_at>/$TARBALL -C $DEST"
