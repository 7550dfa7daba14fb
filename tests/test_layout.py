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
