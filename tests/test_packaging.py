"""The package as users get it. The sdist and wheel built from a clean checkout (the files git
tracks or would track, so uncommitted work is included), offline with this environment's
setuptools as ``pip wheel --no-build-isolation`` or ``python -m build --no-isolation`` build them,
hold the license, py.typed, every module and data file of the package and nothing else, and carry
the metadata (version, platform marker on triton); the wheel installed on its own imports and
runs. And the public API is typed, as py.typed promises."""

from __future__ import annotations

import email.parser
import importlib.metadata
import inspect
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import no_triton
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

import triton_gelu

REPO = no_triton.REPO
# setuptools 77 reads pyproject's SPDX `license` and `license-files` (PEP 639).
SETUPTOOLS_NEEDED = 77


def _clean_checkout(destination: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in listed:
        if name and (REPO / name).is_file():  # (a tracked file deleted in the work tree is not)
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """{"src": the clean checkout, "wheel": ..., "sdist": ...}, built once for the module."""
    try:
        setuptools = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        setuptools = "none"
    if setuptools == "none" or int(setuptools.split(".")[0]) < SETUPTOOLS_NEEDED:
        pytest.skip(f"building needs setuptools>={SETUPTOOLS_NEEDED}, this environment has "
                    f"{setuptools} (scripts/test.sh installs it)")
    root = tmp_path_factory.mktemp("build")
    src, out = _clean_checkout(root / "src"), root / "dist"
    # The PEP 517 hooks, as build frontends call them (they rewrite sys.argv: read it first).
    hooks = ("import sys, setuptools.build_meta as backend; out = sys.argv[1]; "
             "print('BUILT', backend.build_sdist(out), backend.build_wheel(out))")
    proc = subprocess.run([sys.executable, "-c", hooks, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sdist, wheel = next(line for line in proc.stdout.splitlines() if line.startswith("BUILT "))\
        .split()[1:]
    return {"src": src, "sdist": out / sdist, "wheel": out / wheel}


def _package_files(src: Path) -> set[str]:
    return {path.relative_to(src).as_posix() for path in (src / "triton_gelu").rglob("*")
            if path.is_file()}


def test_wheel_contents(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    dist_info = f"triton_gelu-{triton_gelu.__version__}.dist-info"
    package = _package_files(built["src"])
    assert {"triton_gelu/py.typed", "triton_gelu/kernels/__init__.py",
            "triton_gelu/patch/__init__.py", "triton_gelu/__main__.py"} <= package
    assert package - names == set(), "files of the package missing from the wheel"
    extra = {n for n in names - package if not n.startswith(dist_info + "/")}
    assert extra == set(), "files in the wheel that are not the package's"
    license_text = zipfile.ZipFile(built["wheel"]).read(f"{dist_info}/licenses/LICENSE")
    assert license_text == (REPO / "LICENSE").read_bytes()


def test_wheel_metadata(built):
    dist_info = f"triton_gelu-{triton_gelu.__version__}.dist-info"
    text = zipfile.ZipFile(built["wheel"]).read(f"{dist_info}/METADATA").decode()
    metadata = email.parser.Parser().parsestr(text)
    assert metadata["Name"] == "triton-gelu"
    assert metadata["Version"] == triton_gelu.__version__
    assert metadata["License-Expression"] == "MIT" and metadata["License-File"] == "LICENSE"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    requirements = {r.name: r for r in map(Requirement, metadata.get_all("Requires-Dist"))
                    if r.marker is None or "extra" not in str(r.marker)}
    assert set(requirements) == {"torch", "triton"}, requirements
    assert requirements["torch"].marker is None
    # Triton is required exactly where it publishes wheels: Linux on x86-64 and aarch64.
    marker: Marker = requirements["triton"].marker
    for system, machine, wanted in (("Linux", "x86_64", True), ("Linux", "aarch64", True),
                                    ("Linux", "s390x", False), ("Darwin", "arm64", False),
                                    ("Windows", "AMD64", False)):
        environment = {"platform_system": system, "platform_machine": machine}
        assert marker.evaluate(environment) is wanted, (marker, environment)


def test_sdist_contents(built):
    top = f"triton_gelu-{triton_gelu.__version__}"
    names = {name.removeprefix(top + "/") for name in tarfile.open(built["sdist"]).getnames()}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "PKG-INFO"} <= names
    assert _package_files(built["src"]) - names == set()
    assert not {n for n in names if n.startswith(("tests", "bench", "scripts"))}


def test_installed_wheel_imports_and_runs(built, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(built["wheel"])],
                   check=True, capture_output=True, timeout=120)
    code = ("import torch, triton_gelu; "
            "x = torch.linspace(-3, 3, 7); "
            "assert (triton_gelu.gelu(x) - torch.nn.functional.gelu(x)).abs().max() < 1e-6; "
            "print(triton_gelu.__version__, triton_gelu.__file__)")
    env = {**no_triton.hidden_env(tmp_path / "cache"), "PYTHONPATH": str(target)}
    env.pop("TRITON_INTERPRET", None)  # the CPU fallback: no Triton needed to prove the install
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, location = proc.stdout.split()
    assert version == triton_gelu.__version__
    assert Path(location).is_relative_to(target), location


def _unannotated(fn) -> list[str]:
    signature = inspect.signature(fn)
    missing = [name for name, p in signature.parameters.items()
               if name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_public_api_is_typed():
    """Every public function, and every public method of a public class, annotates each argument
    and its return: what py.typed tells type checkers."""
    gaps = {}
    for name in no_triton.public_names():
        obj = triton_gelu
        for part in name.split("."):
            obj = getattr(obj, part)
        if inspect.isclass(obj):
            methods = {f"{name}.{m}": f for m, f in vars(obj).items()
                       if inspect.isfunction(f) and (not m.startswith("_") or m == "__init__")}
            methods.update({f"{name}.{m}": f.__func__ for m, f in vars(obj).items()
                            if isinstance(f, (classmethod, staticmethod))})
        else:
            methods = {name: inspect.unwrap(obj)}
        gaps.update({label: missing for label, fn in methods.items()
                     if (missing := _unannotated(fn))})
    assert not gaps, f"public functions with arguments or returns not annotated: {gaps}"
