#!/usr/bin/env bash
# Every GPU measurement (benchmarks/gpu_suite.py) within a hard time budget, JSON into OUT_DIR.
#
#   PYTHONPATH=. bash benchmarks/gpu.sh OUT_DIR          # one GPU, under 8 minutes
#   PYTHONPATH=. bash benchmarks/gpu.sh --tiny OUT_DIR   # tiny sizes on CPU, well under a minute
#
# Environment: PYTHON (default python3), MFU_BATCH_SIZE (default 16, halved on out-of-memory),
# MFU_SCAN_UNROLL (default 1: a rolled loop over the 24 layers; true unrolls them).
# The suite's watchdog ends it (exit 75) when a measurement overruns its own limit; it is then
# started again and skips what OUT_DIR/summary.json records. `timeout` bounds every start by
# what is left of the budget. Exit status 0 only if every measurement succeeded.
set -u

mode=(); budget_s=470
if [[ "${1:-}" == "--tiny" ]]; then
  mode=(--tiny); budget_s=150; shift
  export JAX_PLATFORMS=cpu  # never touch an accelerator in the rot check
  tiny=1
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash benchmarks/gpu.sh [--tiny] OUT_DIR (got: $*)" >&2
  exit 2
fi
out=$(realpath -m "$1")
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${tiny:-}" ]]; then  # the tests' compilation cache, every program: a rerun compiles little
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
fi
# the MFU run's state and activations need most of the 141 GB; XLA takes 75% by default
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
python=${PYTHON:-python3}
mkdir -p "$out"

start=$SECONDS
while :; do
  left=$((budget_s - (SECONDS - start)))
  if ((left < 15)); then
    echo "gpu.sh: the ${budget_s} s budget is spent" | tee -a "$out/log.txt"
    break
  fi
  timeout --kill-after=5 "$left" "$python" benchmarks/gpu_suite.py "${mode[@]}" \
    --budget-s "$((left - 5))" --mfu-batch-size "${MFU_BATCH_SIZE:-16}" \
    --mfu-scan-unroll "${MFU_SCAN_UNROLL:-1}" "$out" 2>&1 \
    | tee -a "$out/log.txt"
  rc=${PIPESTATUS[0]}
  ((rc == 75)) || break  # 75: the watchdog stopped an overrun; go on with the rest
done
"$python" benchmarks/gpu_suite.py --summarize "$out"
