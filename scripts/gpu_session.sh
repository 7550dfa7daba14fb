#!/usr/bin/env bash
# A GPU session in calls of at most 10 minutes, one stage per call. Every stage writes its
# records as it goes (a killed call still returns what finished), stops itself before
# $STAGE_SECONDS (default 540), says what remains, and when called again continues where it
# stopped:
#
#   scripts/gpu_session.sh first-contact  # first, on any new GPU: the environment and device
#                                         # ceilings, every op's native correctness by every
#                                         # path, timings against eager and torch.compile, peak
#                                         # memory (bench/first_contact.py); about 6 minutes
#                                         # cold, 4 files
#   scripts/gpu_session.sh first-contact --dry-run   # the same on the CPU (interpreter, tiny)
#   scripts/gpu_session.sh tests          # the suite natively (CUDA-graph tests included)
#   scripts/gpu_session.sh export         # tune under the full policy into the shipped table
#                                         # (the first-contact problems first)
#   scripts/gpu_session.sh bench [ARGS]   # the benchmark (default: --quick)
#
# Where the files go: $OUT when it is set (a lease's folder that comes back), else
# bench/results/<date>-<gpu>/. A fresh machine continues from what is committed: each stage
# first copies its own files from bench/results/<date>-<gpu>/ into an $OUT that lacks them, so
# commit what a call returned there (export's table: into triton_gelu/tuning/tuned/ as well).
# Compiled kernels and tunings are kept in .gpu-session/ (ignored by git) between calls on a
# machine that stays warm.
set -uo pipefail
stage=${1:-}
[ $# -gt 0 ] && shift
case "$stage" in
  first-contact|tests|export|bench) ;;
  *) echo "usage: scripts/gpu_session.sh first-contact [--dry-run]|tests|export|bench [ARGS]" >&2
     exit 2 ;;
esac
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh" || exit 1
limit=${STAGE_SECONDS:-540}
budget=$((limit - 60))  # the stage's own deadline: a case started before it still finishes
keep=$PWD/.gpu-session
mkdir -p "$keep"
export TRITON_CACHE_DIR="$keep/triton-cache"

dry=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry=1; done
where=$("$PY" -c 'import re, sys, torch
gpu = torch.cuda.is_available() and not int(sys.argv[1])
name = torch.cuda.get_device_name() if gpu else "cpu-dry-run"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))' "$dry")
results=bench/results/$(date -u +%F)-$where
out=${OUT:-$results}
mkdir -p "$out"

seed() {  # copy the committed files of this day and GPU that $out lacks
  local name
  [ "$(cd "$out" && pwd)" = "$(cd "$results" 2>/dev/null && pwd)" ] && return
  for name in "$@"; do
    [ -f "$results/$name" ] && [ ! -f "$out/$name" ] && cp "$results/$name" "$out/$name"
  done
  return 0
}

case "$stage" in
  first-contact)
    seed environment.jsonl correctness.jsonl timings.jsonl memory.jsonl
    timeout "$limit" "$PY" -m bench.first_contact --out "$out" --budget-s "${BUDGET_S:-330}" "$@"
    rc=$?
    echo "first-contact rc=$rc ($out)"
    exit $rc
    ;;
  tests)
    # One pytest process; each finished test is a line of the ledger, which the next call reads
    # to skip what passed (tests/conftest.py).
    seed tests-ledger.txt
    export TRITON_GELU_CACHE_DIR="$keep/test-cache"
    export TRITON_GELU_TEST_LEDGER=$out/tests-ledger.txt
    TRITON_GELU_TEST_DEADLINE=$(($(date +%s) + budget))
    export TRITON_GELU_TEST_DEADLINE
    timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
      --ignore=tests/test_aot_compile.py "$@" >> "$out/tests.log" 2>&1
    rc=$?
    tail -25 "$out/tests.log"
    echo "tests rc=$rc; ledger: $(cut -d' ' -f1 "$TRITON_GELU_TEST_LEDGER" 2>/dev/null | sort |
      uniq -c | tr -s ' \n' ' ')"
    [ $rc -eq 3 ] && echo "tests: deadline reached; call again to run the rest"
    [ $rc -eq 5 ] && echo "tests: nothing left to run (every test in the ledger passed)"
    exit $rc
    ;;
  export)
    arch=$("$PY" -c 'import torch; print("sm%d%d" % torch.cuda.get_device_capability())')
    [ -f "$out/$arch.json" ] || cp "triton_gelu/tuning/tuned/$arch.json" "$out/$arch.json"
    export TRITON_GELU_CACHE_DIR="$keep/autotune-cache"
    timeout "$limit" "$PY" -m triton_gelu.autotune --export "$out/$arch.json" \
      --budget-s "$budget" "$@" >> "$out/export.log" 2>&1
    rc=$?
    tail -15 "$out/export.log"
    case $rc in
      0) echo "export complete: commit $out/$arch.json as triton_gelu/tuning/tuned/$arch.json" ;;
      3) echo "export: budget reached; call again to continue" ;;
      *) echo "export rc=$rc" ;;
    esac
    exit $rc
    ;;
  bench)
    # shellcheck disable=SC2046  # the bench's own lines, one file per run's stem
    seed $(cd "$results" 2>/dev/null && ls -- *.jsonl 2>/dev/null | grep -v -x -E \
      '(environment|correctness|timings|memory)\.jsonl')
    TRITON_GELU_CACHE_DIR=$(mktemp -d "$keep/bench-cache.XXXX")
    export TRITON_GELU_CACHE_DIR
    [ $# -gt 0 ] || set -- --quick
    timeout "$limit" "$PY" -m bench --out "$out" --budget-s "$budget" "$@" \
      >> "$out/bench.log" 2>&1
    rc=$?
    tail -40 "$out/bench.log"
    echo "bench rc=$rc"
    exit $rc
    ;;
esac
