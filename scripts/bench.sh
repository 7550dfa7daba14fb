#!/usr/bin/env bash
# Run every benchmark against PyTorch (GPU), or the interpreter correctness check (no GPU).
# Extra arguments go to `python -m bench` (see `scripts/bench.sh --help`).
set -euo pipefail
TRITON_GELU_MODULES="triton triton numpy numpy matplotlib matplotlib" \
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m bench "$@"
