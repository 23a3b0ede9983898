#!/usr/bin/env bash
# One-shot GPU check of the offloading engine, for one call on the H100 host (~9 min):
#   1. the CUDA-marked tests (real copy stream, events, pinned memory);
#   2. runtime.bench at --gpu-memory 12GiB and 16GiB, Mixtral-8x7B shapes, 2-bit experts,
#      trace and model routing, variants naive / lru / prefetch;
#   3. the same at 12GiB with --host-memory 8GiB: about half the experts stream from the file.
# Everything lands in $OUT (default out/gpu_check): at most 7 files, so all of them come back.
# Knobs: LAYERS (32), TOKENS (24), WARMUP (6), DEADLINE (seconds for the whole script, 530),
# BENCH_CACHE (where the ~17 GB synthetic file is written, /tmp/moe-pack-bench), BENCH_FLAGS
# (extra bench flags; BENCH_FLAGS="--tiny --device cpu" LAYERS=3 smoke-tests this script anywhere).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
LAYERS=${LAYERS:-32}
TOKENS=${TOKENS:-24}
WARMUP=${WARMUP:-6}
DEADLINE=${DEADLINE:-530}
CACHE=${BENCH_CACHE:-/tmp/moe-pack-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; free -g; df -h "$(dirname "$CACHE")"
} > "$OUT/machine.txt" 2>&1

# 1. CUDA tests (collection errors elsewhere, e.g. a missing hqq, must not stop them)
timeout 200 $PY -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors -rs 2>&1 \
  | tail -n 200 > "$OUT/pytest_cuda.log"
echo "pytest -m cuda: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest_cuda.log"

bench() {  # name, then bench arguments
  local name=$1; shift
  local t=$(( $(left) - 5 ))
  if (( t < 30 )); then echo "skipped $name: out of time" | tee "$OUT/$name.log"; return; fi
  timeout "$t" $PY -m runtime.bench --layers "$LAYERS" --expert-bits 2 --tokens "$TOKENS" --warmup "$WARMUP" \
    --routing all --variant all --cache-dir "$CACHE" --json "$OUT/$name.json" --write-md "$OUT/BENCHMARKS.md" \
    ${BENCH_FLAGS:-} "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
}

# 2. budgets with every expert in pinned host RAM (the first run writes the synthetic file)
bench bench_budgets --gpu-memory 12GiB --gpu-memory 16GiB
# 3. RAM short: the rest of the experts are read from the file on demand
bench bench_streaming --gpu-memory 12GiB --host-memory 8GiB

tail -n 3 "$OUT"/*.log
echo "total $(( $(date +%s) - start )) s"
