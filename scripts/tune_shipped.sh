#!/usr/bin/env bash
# Re-tune and re-ship every record set shipped in fscnn_tvm/schedules/ (run nothing else
# meanwhile: candidates are timed). Each line: a tuning job, then its best records shipped with the
# tune arguments that built the model. A job's log (tuning_logs/NAME) starts from the shipped
# set's records of its dense ops when it does not exist yet, so a sparse-only job (0 dense
# trials) keeps them; ~1 s a sparse candidate on 2 cores.
# Usage: bash scripts/tune_shipped.sh [name ...]   (no names: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
AVX512='llvm -mcpu=znver4'
AVX2='llvm -mcpu=znver3'
# The tuner and the shipping step run with fscnn_tvm.target.on_host off, as the staleness test
# builds each set: a set's kernels are built for the caches its target.json names even where
# its mcpu is this machine's own (znver4 on a Zen 4 or Zen 5, whose caches may differ), instead
# of being tuned and re-labelled with this machine's.
OFF_HOST='import runpy, sys; import fscnn_tvm.target as T; T.on_host = lambda target: False'
fscnn() { "$PY" -c "$OFF_HOST; from fscnn_tvm.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
ship() { "$PY" -c "$OFF_HOST; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
  scripts/ship_schedules.py "$@"; }
# The caches each set's kernels are built for, as its target.json names them (a new set: the
# cross-target default).
caches_for() {
  "$PY" - "fscnn_tvm/schedules/$1/target.json" <<'PYEOF'
import json, sys
try:
    caches = json.load(open(sys.argv[1]))["caches"]
except (OSError, KeyError, ValueError):
    from fscnn_tvm.target import CROSS_CACHES as caches
print(",".join(str(int(c)) for c in caches))
PYEOF
}

job() {  # name target dense-trials sparse-trials fscnn-tvm-tune-args...
  local name=$1 target=$2 dense=$3 sparse=$4; shift 4
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  export FSCNN_TVM_CACHES; FSCNN_TVM_CACHES=$(caches_for "$name")
  echo "== $name ($target, caches $FSCNN_TVM_CACHES, $dense dense + $sparse sparse trials)"
  if [ ! -d "tuning_logs/$name" ]; then
    ship --seed "$name" "tuning_logs/$name"
  fi
  # The first job tunes both modules (dense-trials each); the second tops the sparse kernels up
  # to sparse-trials: they tune fast (~1 s a candidate) and gain the most from it.
  if [ "$dense" -gt 0 ]; then
    fscnn tune --target "$target" --trials "$dense" --log "tuning_logs/$name" "$@"
  fi
  # (every pruned conv sparse, as the staleness test imports them: no timed sparse/dense race)
  fscnn tune --target "$target" --trials "$sparse" --log "tuning_logs/$name" --no-dense --no-measure "$@"
  ship "tuning_logs/$name" "$name" --target "$target" --tuned-on "$*"
}
ONLY="$*"

# Sparse kernels only (their layout changed; the dense records still match): the tuner rarely
# beats the default schedules of the chunked kernels (docs/performance.md), so short budgets.
# AVX-512: what scripts/bench_targets.py measures, and `make demo`'s VGG16-CIFAR.
job vgg16_224_s90_avx512 "$AVX512" 0 128 --model vgg16 --sparsity 0.9
job resnet50_s90_avx512 "$AVX512" 0 128 --model resnet50 --sparsity 0.9
job vgg16_224_s60_avx512 "$AVX512" 0 64 --model vgg16 --sparsity 0.6
job vgg16_224_b8x1_s90_avx512 "$AVX512" 0 64 --model vgg16 --sparsity 0.9 --prune block --block 8x1 --fmt bsr
job vgg16_cifar_s90_avx512 "$AVX512" 0 64 --model vgg16_cifar --sparsity 0.9
# AVX2 (+FMA): every zoo model at 90 %.
job vgg16_cifar_s90_avx2 "$AVX2" 0 64 --model vgg16_cifar --sparsity 0.9
job vgg16_224_s90_avx2 "$AVX2" 0 64 --model vgg16 --sparsity 0.9
job resnet18_s90_avx2 "$AVX2" 0 64 --model resnet18 --sparsity 0.9
job resnet50_s90_avx2 "$AVX2" 0 128 --model resnet50 --sparsity 0.9
job mobilenet_v2_s90_avx2 "$AVX2" 0 64 --model mobilenet_v2 --sparsity 0.9
