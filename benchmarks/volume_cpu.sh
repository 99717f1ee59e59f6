#!/usr/bin/env bash
# Issue 17's CPU measurement in one run: the ResNet-18-3D encoder fwd+bwd at 96^3 crops, batch 2, mask ratio 0.6,
# float32, one torch thread: the torch backend against SparK's 3-D emulation (dense backend). Every case runs in a
# fresh process (--isolate); time is the median of the timed steps, peak memory the median over those steps of the
# peak resident set size above the one before the step (benchmarks/bench_timing.py: PEAK_RSS_METHOD).
# Run twice: with glibc's default allocator (time and memory), and with MALLOC_MMAP_THRESHOLD_=131072, which
# returns every freed block of 128 KiB or more to the system at once, so the peak is the live memory's and not
# what the allocator keeps cached (memory only: its page faults slow both backends down).
#
#   bash benchmarks/volume_cpu.sh OUT_DIR          # from the repository root; about 5 minutes on 2 cores
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: volume_cpu.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ARGS="--device cpu --arch resnet18_3d --batch 2 --size 96 --mask-ratios 0.6 --backends dense,torch --precision fp32 --warmup 1 --rotate 1 --isolate"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores; memory $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"
export CTSSL_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
$PY benchmarks/encoder_timing.py $ARGS --iters 5 --json "$OUT/volume-encoder.json" --markdown "$OUT/volume-encoder.md"
a=$?
MALLOC_MMAP_THRESHOLD_=131072 $PY benchmarks/encoder_timing.py $ARGS --iters 3 --json "$OUT/volume-encoder-mmap-threshold.json" \
  --markdown "$OUT/volume-encoder-mmap-threshold.md"
b=$?
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
exit $(( a > b ? a : b ))
