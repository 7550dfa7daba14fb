#!/usr/bin/env bash
# A GPU session in a few calls of at most 10 minutes, one stage per call, each stage logging and
# copying what it made under $OUT (default ./gpu-out):
#
#   scripts/gpu_session.sh tests          # the suite natively (the CUDA-graph tests included)
#   scripts/gpu_session.sh export         # tune the bench presets and decode shapes under the
#                                         # full policy into triton_gelu/tuned/<arch>.json
#   scripts/gpu_session.sh bench [ARGS]   # the benchmark (default: --quick), on a fresh tuning
#                                         # cache so the first-call tuning times are real
#
# Each stage stops itself after $STAGE_SECONDS (default 540) so its files always come back.
# export resumes: the table lists the problems it finished, so commit $OUT/tuned/<arch>.json
# into triton_gelu/tuned/ and call `export` again until it prints "export complete". Commit
# $OUT/results/* into bench/results/. A full bench outlasts one call: run it in slices, e.g.
#   bench --ops linear_gelu --preset bert-base --no-compile --tag linear-bert
#   bench --ops linear_gelu,ffn --preset llama-7b --modes infer --tag llama-infer
# Compiled kernels and tunings are kept in .gpu-session/ (ignored by git) between calls on a
# machine that stays warm.
set -uo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
stage=${1:-}
[ $# -gt 0 ] && shift
out=${OUT:-$PWD/gpu-out}
budget=${STAGE_SECONDS:-540}
keep=$PWD/.gpu-session
mkdir -p "$out" "$keep"
export TRITON_CACHE_DIR="$keep/triton-cache"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$PY" -c 'import torch, triton
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
  | tee "$out/versions.txt"

case "$stage" in
  tests)
    export TRITON_GELU_CACHE_DIR="$keep/test-cache"
    timeout "$budget" "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
      --ignore=tests/test_aot_compile.py > "$out/tests.log" 2>&1
    echo "tests rc=$?"; tail -25 "$out/tests.log"
    ;;
  export)
    export TRITON_GELU_CACHE_DIR="$keep/autotune-cache"
    timeout "$budget" "$PY" -m triton_gelu.autotune --export "$@" > "$out/export.log" 2>&1
    rc=$?
    mkdir -p "$out/tuned" && cp triton_gelu/tuned/*.json "$out/tuned/"
    echo "export rc=$rc"; tail -15 "$out/export.log"
    if [ $rc -eq 0 ]; then echo "export complete"; else echo "export cut short: call it again"; fi
    ;;
  bench)
    TRITON_GELU_CACHE_DIR=$(mktemp -d "$keep/bench-cache.XXXX")
    export TRITON_GELU_CACHE_DIR
    [ $# -gt 0 ] || set -- --quick
    timeout "$budget" "$PY" -m bench --out "$out/results" "$@" > "$out/bench.log" 2>&1
    echo "bench rc=$?"; tail -40 "$out/bench.log"
    ;;
  *)
    echo "usage: scripts/gpu_session.sh tests|export|bench [bench or export arguments]" >&2
    exit 2
    ;;
esac
