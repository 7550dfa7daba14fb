#!/usr/bin/env bash
# Run the test suite: natively on a GPU, under the Triton interpreter without one.
# Extra arguments go to pytest (e.g. scripts/test.sh -k linear -x).
set -euo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy pytest pytest xdist pytest-xdist
  transformers transformers matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# tests/test_packaging.py builds the wheel offline with this venv's setuptools, which must read
# pyproject's SPDX license (setuptools >= 77; torch itself requires it, but an older system torch
# may not have brought it).
"$PY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
  2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "setuptools>=77" \
  || echo "test.sh: setuptools>=77 could not be installed (offline?): the wheel test will fail" >&2
# Two workers by default (CI machines have two cores); TRITON_GELU_TEST_WORKERS=0 runs serially.
# worksteal: an idle worker takes half of a busy one's queue. The default (load) hands each
# worker its first tests in one batch, so the AOT compile tests (minutes each, collected first)
# would all queue on one worker while the other finishes early.
exec "$PY" -m pytest -n "${TRITON_GELU_TEST_WORKERS:-2}" --dist worksteal "$@"
