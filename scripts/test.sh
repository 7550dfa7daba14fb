#!/usr/bin/env bash
# Run the test suite: natively on a GPU, under the Triton interpreter without one.
# Extra arguments go to pytest (e.g. scripts/test.sh -k linear -x).
set -euo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest transformers transformers
  matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m pytest "$@"
