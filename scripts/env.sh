# Sourced by scripts/test.sh and scripts/bench.sh: make a virtual environment with what the
# package needs and set $PY to its python. Idempotent: a second run installs nothing.
#
# - A machine whose python3 already has a CUDA build of torch (a GPU box) gets a venv that sees
#   those system packages, so the installed torch and triton are used as they are.
# - Anywhere else the venv gets torch==2.13.0 (a CPU build on our machines; an unpinned `torch`
#   would pull a multi-GB CUDA build) and the newest triton, whose interpreter runs the kernels.
# Set TRITON_GELU_VENV to put the venv elsewhere (default: .venv in the repository).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TRITON_GELU_VENV:-$root/.venv}

if [ ! -x "$venv/bin/python" ]; then
  if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "env: python3 has a CUDA torch; making $venv on top of the system packages" >&2
    python3 -m venv --system-site-packages "$venv"
  else
    echo "env: making $venv with a CPU torch (Triton kernels run under the interpreter)" >&2
    python3 -m venv "$venv"
  fi
fi
PY=$venv/bin/python

_missing() {  # print the pip requirement for each module that does not import
  local module requirement
  while [ $# -gt 0 ]; do
    module=$1 requirement=$2; shift 2
    "$PY" -c "import $module" 2>/dev/null || echo "$requirement"
  done
}

if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
# shellcheck disable=SC2086  # word splitting of the requirement list is intended
wanted=$(_missing ${TRITON_GELU_MODULES:-triton triton numpy numpy pytest pytest})
if [ -n "$wanted" ]; then
  echo "env: installing" $wanted >&2
  "$PY" -m pip install --quiet --disable-pip-version-check $wanted
fi
cd "$root"
