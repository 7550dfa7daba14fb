# Sourced by scripts/test.sh, scripts/bench.sh and scripts/gpu_session.sh: find or make a Python
# with what the package needs and set $PY to it. Idempotent: a second run installs nothing.
#
# Which Python, first match wins:
# 1. $TRITON_GELU_VENV, when set and it already holds a python: used as it is.
# 2. `python3`, when it already has torch >= 2.11 (a GPU box's venv or conda environment, a
#    system Python): used as it is, the interpreter itself ($PY is its sys.executable), so its
#    torch and triton are the ones that run. torch is never installed over it. (A venv made
#    with --system-site-packages from a python3 that is itself a venv would see the *base*
#    interpreter's packages, not this environment's: no torch.)
# 3. A venv at $TRITON_GELU_VENV (default .venv in the repository), made here if missing, with
#    torch==2.13.0. Only a CPU build is installed unasked: where pip would resolve that pin to a
#    CUDA build (several GB: PyPI's Linux wheels) on a machine without an NVIDIA driver, it stops
#    and prints the line that gets the CPU build (TRITON_GELU_TORCH_INDEX, PyTorch's CPU index)
#    or the one that accepts the CUDA build (TRITON_GELU_ALLOW_CUDA_TORCH=1).
# Then each module of $TRITON_GELU_MODULES (pairs: module, pip requirement) that does not import
# is installed; where that fails (no network) it warns and goes on: what needs it will say so.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TRITON_GELU_VENV:-$root/.venv}
TORCH_PIN=torch==2.13.0

_has_torch() {  # the interpreter $1 imports torch >= 2.11
  "$1" -c 'import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if v >= (2, 11) else 1)' 2>/dev/null
}

_pip() {
  "$PY" -m pip install --quiet --disable-pip-version-check "$@"
}

_install_torch() {  # into the new venv: a CPU build, or a CUDA build only where it can run or asked
  local index=() report
  [ -n "${TRITON_GELU_TORCH_INDEX:-}" ] && index=(--index-url "$TRITON_GELU_TORCH_INDEX")
  if [ -z "${TRITON_GELU_ALLOW_CUDA_TORCH:-}" ] && [ -z "${TRITON_GELU_TORCH_INDEX:-}" ] \
      && [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    report=$(mktemp)
    # Resolve without downloading: the wheel pip would take requires nvidia-* packages if and
    # only if it is a CUDA build.
    if "$PY" -m pip install --quiet --disable-pip-version-check --dry-run --no-deps \
        --ignore-installed --report "$report" "$TORCH_PIN" 2>/dev/null \
        && grep -q '"nvidia-' "$report"; then
      rm -f "$report"
      cat >&2 <<EOF
env: no torch here, and pip would install a CUDA build of $TORCH_PIN (several GB) on a
env: machine without an NVIDIA driver. For the CPU build (about 200 MB), run
env:   TRITON_GELU_TORCH_INDEX=https://download.pytorch.org/whl/cpu $0
env: or, to take the CUDA build anyway: TRITON_GELU_ALLOW_CUDA_TORCH=1 $0
EOF
      return 1
    fi
    rm -f "$report"
  fi
  echo "env: installing $TORCH_PIN into $venv" >&2
  _pip "${index[@]}" "$TORCH_PIN"
}

if [ -n "${TRITON_GELU_VENV:-}" ] && [ -x "$venv/bin/python" ]; then
  PY=$venv/bin/python
elif command -v python3 >/dev/null 2>&1 && _has_torch python3; then
  PY=$(python3 -c 'import sys; print(sys.executable)')
  echo "env: using $PY as it is (it has torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "env: making $venv" >&2
    python3 -m venv "$venv"
  fi
  PY=$venv/bin/python
  if ! _has_torch "$PY"; then
    _install_torch || return 1 2>/dev/null || exit 1
  fi
fi

_missing() {  # print the pip requirement for each module that does not import
  local module requirement
  while [ $# -gt 0 ]; do
    module=$1 requirement=$2; shift 2
    "$PY" -c "import $module" 2>/dev/null || echo "$requirement"
  done
}

# shellcheck disable=SC2086  # word splitting of the requirement list is intended
wanted=$(_missing ${TRITON_GELU_MODULES:-triton triton numpy numpy pytest pytest})
if [ -n "$wanted" ]; then
  echo "env: installing" $wanted >&2
  # shellcheck disable=SC2086
  _pip $wanted || echo "env: could not install $wanted (offline?); going on without" >&2
fi
cd "$root"
