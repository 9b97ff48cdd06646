#!/usr/bin/env bash
# Re-tune and re-ship every record set shipped in fscnn_tvm/schedules/ (about 3 h on 2 cores,
# most of it the dense ops; run nothing else meanwhile: candidates are timed). Each line: a
# tuning job, then its best records shipped with the tune arguments that built the model.
# Usage: bash scripts/tune_shipped.sh [name ...]   (no names: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FSCNN=${FSCNN:-.venv/bin/fscnn-tvm}
AVX512='llvm -mcpu=znver4'
AVX2='llvm -mcpu=znver3'

job() {  # name target dense-trials sparse-trials fscnn-tvm-tune-args...
  local name=$1 target=$2 dense=$3 sparse=$4; shift 4
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name ($target, $dense dense + $sparse sparse trials)"
  # The first job tunes both modules (dense-trials each); the second tops the sparse kernels up
  # to sparse-trials: they tune fast (~1 s a candidate) and gain the most from it.
  if [ "$dense" -gt 0 ]; then
    "$FSCNN" tune --target "$target" --trials "$dense" --log "tuning_logs/$name" "$@"
  fi
  "$FSCNN" tune --target "$target" --trials "$sparse" --log "tuning_logs/$name" --no-dense "$@"
  "$PY" scripts/ship_schedules.py "tuning_logs/$name" "$name" --target "$target" --tuned-on "$*"
}
ONLY="$*"

# AVX-512: what scripts/bench_targets.py measures (dense records of vgg16_224_s90 serve s60 too).
# Sparse budgets: the session-4 tuning plus session 5's top-up for the banded kernels (10-22 min
# of sparse trials per log, ~1.3 trials/s), rounded.
job vgg16_224_s90_avx512 "$AVX512" 500 3600 --model vgg16 --sparsity 0.9
job resnet50_s90_avx512 "$AVX512" 400 2900 --model resnet50 --sparsity 0.9
job vgg16_224_s60_avx512 "$AVX512" 0 1150 --model vgg16 --sparsity 0.6
job vgg16_224_b8x1_s90_avx512 "$AVX512" 0 3100 --model vgg16 --sparsity 0.9 --prune block --block 8x1 --fmt bsr
job vgg16_cifar_s90_avx512 "$AVX512" 680 700 --model vgg16_cifar --sparsity 0.9  # what `make demo` runs
# AVX2 (+FMA): every zoo model at 90 %.
job vgg16_cifar_s90_avx2 "$AVX2" 150 300 --model vgg16_cifar --sparsity 0.9
job vgg16_224_s90_avx2 "$AVX2" 150 300 --model vgg16 --sparsity 0.9
job resnet18_s90_avx2 "$AVX2" 150 300 --model resnet18 --sparsity 0.9
job resnet50_s90_avx2 "$AVX2" 150 600 --model resnet50 --sparsity 0.9
job mobilenet_v2_s90_avx2 "$AVX2" 150 300 --model mobilenet_v2 --sparsity 0.9
