"""The package's layout rules, read from the source (nothing is imported): no import circle in
``triton_gelu`` or ``bench``, deferred imports and ``importlib`` calls included, and no file
importing another file's private names (a private *module* is the package's own business)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _absolute(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module name a relative import in ``module`` (file ``path``) names."""
    if not level:
        return name or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(line, imported module, names) for every import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path, node.level, node.module)
            submodules = [f"{target}.{a.name}" for a in node.names
                          if f"{target}.{a.name}" in modules]
            for sub in submodules:  # `from . import x`: the module x itself
                yield node.lineno, sub, ()
            names = tuple(a.name for a in node.names if f"{target}.{a.name}" not in modules)
            if names:
                yield node.lineno, target, names
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, node.args[0].value, ()


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target, _ in _imports(module, path, modules):
            while target and target not in modules:  # a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)  # (a package's __init__ runs before its modules)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["triton_gelu", "bench"])
def test_no_import_circle(package):
    cycle = _cycle(_graph(package))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_a_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_imports_another_files_private_names():
    modules = _modules("triton_gelu")
    found = []
    for module, path in modules.items():
        for line, target, names in _imports(module, path, modules):
            if target.startswith("triton_gelu") and target != module:
                found += [f"{path.relative_to(ROOT)}:{line}: {target}.{name}" for name in names
                          if name.startswith("_") and not name.startswith("__")]
        tree = ast.parse(path.read_text())
        siblings = {alias.asname or alias.name.rpartition(".")[2]
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names
                    if f"{_absolute(module, path, node.level, node.module)}.{alias.name}" in modules}
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in siblings and node.attr.startswith("_")
                  and not node.attr.startswith("__")]
    assert not found, "private names used across files:\n" + "\n".join(found)


# ---- tests go through the public API ------------------------------------------------------------
# The modules a test may import: the public API (README "Use"; patch/ as its package exports),
# the helpers for tests, the CLI, the references, and the tuning package with its modules (the
# chooser, cost model and tables are tested as units). Any other module of the package is its
# own business: a test that imports it breaks when the package is rearranged.
PUBLIC_MODULES = ("triton_gelu", "triton_gelu.autotune", "triton_gelu.parallel",
                  "triton_gelu.testing", "triton_gelu.activations", "triton_gelu.reference",
                  "triton_gelu.patch", "triton_gelu.__main__", "triton_gelu.tuning")
# The test files (and their helper modules) that still import another module of the package,
# each with why. Shrink this list; do not grow it.
PRIVATE_IMPORTS_ALLOWED = {
    "no_triton.py": "resets once-per-process state (the fallback warning, DTensor's layout "
                    "warnings) and checks which launchers a tensor gets, in a Triton-less process",
    "test_no_triton.py": "the Triton launchers and the fallback's must have one signature",
    "test_compile.py": "opcheck of the custom ops (ops/) and their autocast probe (ops._core)",
    "test_compile_backend.py": "reads compile_route's history of what the backend rewrote",
    "conftest.py": "imports the kernels once, filling the tuning registries (every Tuner and "
                   "Paths) that the tests of the tuning units read",
    "test_linear_gelu.py": "launcher units: the strides a launcher sees, save_preact, each "
                           "Paths candidate directly, input_precision",
    "test_ffn.py": "kernel units: each tile config's dropout epilogue, shards' column offsets, "
                   "the launchers' needs masks, the custom ops' opcheck, the fallback's twin",
    "test_geglu.py": "kernel units: each tile config's mask, shards' column offsets, the "
                     "launchers' needs masks and gate/up outputs, the custom ops' opcheck",
    "test_hopper.py": "TMA units: tma_compatible / tma_applies / tma_device on fake devices",
    "test_paths.py": "the settings' precedence (_settings.tune_policy) and the capture guard "
                     "on a CPU-only torch (_runtime.capturing)",
    "test_parallel.py": "the custom ops' DTensor sharding rules, called directly",
    "test_plans.py": "counts the plans built (_plans.counts) and the op's validations",
    "test_patch_gated.py": "counts the calls of patch.gated's fused-block route (T5's casts)",
    "compile_families.py": "reads compile_route's history of what the backend rewrote",
}


def _private_imports(path: Path, modules: dict[str, Path]) -> list[str]:
    """'line: module' for each module of the package outside PUBLIC_MODULES that the file
    imports, reaches as an attribute of ``triton_gelu`` or names to setattr/import_module."""
    def private(name: str) -> bool:
        while name and name not in modules:  # a name inside a module: that module
            name = name.rpartition(".")[0]
        return bool(name) and name not in PUBLIC_MODULES \
            and not name.startswith("triton_gelu.tuning.")  # the tuning units, as a whole

    found = [f"{line}: {target}"
             for line, target, _ in _imports("tests." + path.stem, path, modules)
             if target.startswith("triton_gelu.") and private(target)]
    for node in ast.walk(ast.parse(path.read_text())):
        dotted = []
        if isinstance(node, ast.Attribute):
            inner = node
            while isinstance(inner, ast.Attribute):
                dotted.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "triton_gelu":
                dotted.insert(0, "triton_gelu")
            else:
                dotted = []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                "setattr", "delattr") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            dotted = node.args[0].value.split(".")
        name = ".".join(dotted)
        if name.startswith("triton_gelu.") and ".".join(dotted[:2]) in modules \
                and private(".".join(dotted[:2])):
            found.append(f"{node.lineno}: {'.'.join(dotted[:2])}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def private_importers(root: Path = ROOT) -> dict[str, list[str]]:
    """{file name under tests/: its private imports} for every file that has any."""
    modules = {m: p for m, p in _modules("triton_gelu").items()}
    out = {}
    for path in sorted((root / "tests").glob("*.py")):
        if found := _private_imports(path, modules):
            out[path.name] = found
    return out


def test_tests_use_the_public_api():
    found = private_importers()
    new = {name: hits for name, hits in found.items() if name not in PRIVATE_IMPORTS_ALLOWED}
    assert not new, (
        "test files importing modules of the package that are not public (use the public API "
        "and triton_gelu.testing; or, for a unit that has no public face, add the file to "
        "PRIVATE_IMPORTS_ALLOWED with its reason):\n"
        + "\n".join(f"tests/{name}:{hit}" for name, hits in new.items() for hit in hits))
    stale = sorted(set(PRIVATE_IMPORTS_ALLOWED) - set(found))
    assert not stale, f"allowed to import private modules but no longer does (remove): {stale}"


def test_a_private_import_is_found(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import triton_gelu\nfrom triton_gelu import _runtime, testing\n"
        "from triton_gelu.kernels import gelu\nimport importlib\n"
        "importlib.import_module('triton_gelu.modules')\n"
        "triton_gelu.ops.gelu_fwd\nfrom triton_gelu.tuning import spaces\n"
        "from triton_gelu.autotune import force_path\n"
        "def f(mp):\n    mp.setattr('triton_gelu._settings.X', 1)\n"
        "from triton_gelu.patch import FusedFeedForward\nfrom triton_gelu.patch.chain import c\n")
    (tmp_path / "tests" / "test_y.py").write_text("import triton_gelu\ntriton_gelu.gelu\n")
    assert private_importers(tmp_path) == {"test_x.py": [
        "2: triton_gelu._runtime", "3: triton_gelu.kernels.gelu", "5: triton_gelu.modules",
        "6: triton_gelu.ops", "10: triton_gelu._settings", "12: triton_gelu.patch.chain"]}
