#!/usr/bin/env bash
# Run the test suite on the oldest torch pyproject.toml declares (its `torch>=` bound) and the
# triton that torch pins, under the Triton interpreter without a GPU. Extra arguments go to pytest
# (default: the whole suite), e.g. scripts/test_oldest.sh tests/test_compile.py -x.
#
# The venv is ${TRITON_GELU_OLDEST_VENV:-.venv-oldest} in the repository root, made on the first
# run and reused after it (a run that finds everything installed installs nothing). PyPI has only
# the CUDA build of torch for Linux x86-64, and it does not import without its nvidia-* libraries
# (`pip install --no-deps torch` fails on libcudnn.so.9), so the first run downloads about 2.7 GB
# of wheels (5 GB installed; about 1.5 minutes on our CI machines). The whole suite then takes
# 3 to 5 minutes on 2 cores (9 with cold Triton and Inductor caches).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TRITON_GELU_OLDEST_VENV:-$root/.venv-oldest}

# The floor as declared, e.g. "torch>=2.11" -> 2.11.0 (its first release).
floor=$(sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
[ -n "$floor" ] || { echo "test_oldest: no \"torch>=X\" dependency in pyproject.toml" >&2; exit 1; }
case $floor in *.*.*) ;; *) floor=$floor.0 ;; esac

# numpy<2.4: Triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses
# (see filterwarnings in pyproject.toml). setuptools>=77: tests/test_packaging.py builds the wheel.
requirements=("torch==$floor" "numpy<2.4" "pytest>=7" "pytest-xdist>=3" "transformers>=4.46"
              "matplotlib>=3.5" "setuptools>=77")

[ -x "$venv/bin/python" ] || { echo "test_oldest: making $venv" >&2; python3 -m venv "$venv"; }
PY=$venv/bin/python
if ! "$PY" - "$floor" <<'EOF' 2>/dev/null
import sys
import matplotlib, numpy, pytest, setuptools, transformers, triton, xdist  # noqa: F401
import torch
ok = (torch.__version__.split("+")[0] == sys.argv[1]
      and int(setuptools.__version__.split(".")[0]) >= 77
      and tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4))
sys.exit(0 if ok else 1)
EOF
then
  echo "test_oldest: installing ${requirements[*]} into $venv" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
fi
"$PY" -c 'import torch, triton; print(f"test_oldest: torch {torch.__version__}, triton {triton.__version__}")'

cd "$root"
# As scripts/test.sh: two workers, worksteal so the AOT compile tests spread over both.
exec "$PY" -m pytest -n "${TRITON_GELU_TEST_WORKERS:-2}" --dist worksteal "$@"
