"""scripts/env.sh picks the Python that runs everything: these run it in throwaway directories.

- A ``python3`` that is itself a virtual environment holding a CUDA torch (as on GPU images) is
  what ``$PY`` runs, as it is: nothing installed into it, no venv made beside it.
- Where no torch is present and pip would resolve the pin to a CUDA build on a machine without
  an NVIDIA driver, env.sh stops and prints the line that gets the CPU build, installing nothing;
  where pip resolves a CPU build, it installs that one.

pip is kept offline (``PIP_NO_INDEX``, its configuration ignored) and offered a stub torch
wheel, so nothing is downloaded and each case takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUB_TORCH = (
    "__version__ = '2.13.0+cu130'\n"
    "class cuda:\n"
    "    is_available = staticmethod(lambda: True)\n"
)


def _repo_copy(tmp: Path) -> Path:
    """A repository holding only scripts/env.sh: env.sh makes its default venv beside it."""
    (tmp / "repo" / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "env.sh", tmp / "repo" / "scripts" / "env.sh")
    return tmp / "repo"


def _venv(path: Path, pip: bool) -> Path:
    args = [sys.executable, "-m", "venv", str(path)] + ([] if pip else ["--without-pip"])
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    return path


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python*/site-packages")
    return site


def _source_env(repo: Path, path_dirs: list[Path], **env) -> subprocess.CompletedProcess:
    """Source env.sh from ``repo`` in bash with ``path_dirs`` first on PATH; print $PY and what
    its torch is."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TRITON_GELU_", "PIP_", "VIRTUAL_ENV"))}
    environ.update(PATH=os.pathsep.join([*map(str, path_dirs), environ["PATH"]]),
                   PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", **env)
    script = (f'source "{repo}/scripts/env.sh" || exit 3; echo "PY=$PY"; '
              '"$PY" -c "import sys, torch; print(\'PREFIX=\' + sys.prefix); '
              'print(\'TORCH=\' + torch.__file__)"')
    return subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True,
                          timeout=240)


def _values(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts}


def test_a_python3_venv_with_a_cuda_torch_runs_as_it_is(tmp_path):
    repo = _repo_copy(tmp_path)
    gpu_env = _venv(tmp_path / "gpu-image-env", pip=False)
    site = _site_packages(gpu_env)
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(STUB_TORCH)
    before = _tree(gpu_env)

    run = _source_env(repo, [gpu_env / "bin"], TRITON_GELU_MODULES="json json")

    assert run.returncode == 0, f"env.sh failed:\n{run.stdout}\n{run.stderr}"
    values = _values(run.stdout)
    assert Path(values["PREFIX"]).resolve() == gpu_env.resolve(), (
        f"$PY ({values['PY']}) runs {values['PREFIX']}, not the python3 environment {gpu_env}")
    assert Path(values["TORCH"]).resolve() == (site / "torch" / "__init__.py").resolve(), \
        f"$PY imports torch from {values['TORCH']}, not the environment's own"
    assert _tree(gpu_env) == before, f"env.sh changed the environment: {_tree(gpu_env) ^ before}"
    assert not (repo / ".venv").exists(), "env.sh made a venv where python3 had torch"


def _stub_wheel(directory: Path, requires: list[str]) -> Path:
    """A torch 2.13.0 wheel holding the stub package, requiring ``requires``."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "torch-2.13.0-py3-none-any.whl"
    info = "torch-2.13.0.dist-info"
    metadata = "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/__init__.py", STUB_TORCH)
        z.writestr(f"{info}/METADATA", metadata)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def _python3_without_torch(tmp: Path) -> Path:
    """A bin directory whose python3 has no torch (and makes venvs with pip)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    base = getattr(sys, "_base_executable", sys.executable)
    (bin_dir / "python3").symlink_to(base)
    return bin_dir


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="this machine has an NVIDIA driver: a CUDA torch is the right one")
def test_no_cuda_torch_is_downloaded_unasked_on_a_machine_without_a_gpu(tmp_path):
    repo = _repo_copy(tmp_path)
    links = tmp_path / "links"
    _stub_wheel(links, ["nvidia-cuda-runtime-cu13==13.0.96; platform_system == 'Linux'"])

    run = _source_env(repo, [_python3_without_torch(tmp_path)], PIP_FIND_LINKS=str(links),
                      TRITON_GELU_MODULES="json json")

    assert run.returncode == 3, f"env.sh went on:\n{run.stdout}\n{run.stderr}"
    assert "TRITON_GELU_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in run.stderr, run.stderr
    assert not list(_site_packages(repo / ".venv").glob("torch*")), "a CUDA torch was installed"


def test_a_cpu_torch_is_installed_into_the_new_venv(tmp_path):
    repo = _repo_copy(tmp_path)
    links = tmp_path / "links"
    _stub_wheel(links, [])

    run = _source_env(repo, [_python3_without_torch(tmp_path)], PIP_FIND_LINKS=str(links),
                      TRITON_GELU_MODULES="json json")

    assert run.returncode == 0, f"env.sh failed:\n{run.stdout}\n{run.stderr}"
    values = _values(run.stdout)
    assert Path(values["PREFIX"]).resolve() == (repo / ".venv").resolve(), values
    assert Path(values["TORCH"]).resolve().is_relative_to(repo / ".venv"), values
