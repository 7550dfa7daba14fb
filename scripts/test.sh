#!/usr/bin/env bash
# Run the test suite: natively on a GPU, under the Triton interpreter without one.
# Extra arguments go to pytest (e.g. scripts/test.sh -k linear -x).
set -euo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest xdist pytest-xdist
  transformers transformers matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Two workers by default (CI machines have two cores); TRITON_GELU_TEST_WORKERS=0 runs serially.
exec "$PY" -m pytest -n "${TRITON_GELU_TEST_WORKERS:-2}" "$@"
