#!/usr/bin/env bash
# One call on a lent GPU machine: the test suite natively, autotuning, then the benchmark, each
# logged under $OUT (default ./gpu-out) with the bench results copied there to be committed
# under bench/results/. Extra arguments go to the bench (default --quick: a full run with
# max-autotune baselines can outlast a 10-minute call; run it in slices with --ops/--preset).
set -uo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
  | tee "$out/versions.txt"
export TRITON_GELU_CACHE_DIR="$out/autotune-cache"
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider --ignore=tests/test_aot_compile.py \
  > "$out/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$out/tests.log"
timeout 120 "$PY" -m triton_gelu.autotune > "$out/autotune.log" 2>&1; echo "autotune rc=$?"
tail -5 "$out/autotune.log"
[ $# -gt 0 ] || set -- --quick
timeout 300 "$PY" -m bench --out "$out/results" "$@" > "$out/bench.log" 2>&1
echo "bench rc=$?"; tail -40 "$out/bench.log"
