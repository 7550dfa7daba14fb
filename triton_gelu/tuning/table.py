"""The shipped tuning table: choices measured once per architecture on a reference GPU, kept as
read-only JSON in the package (``triton_gelu/tuning/tuned/sm90.json``, ``sm80.json``). No Triton
needed.

``python -m triton_gelu.autotune --export`` writes it on a GPU; until a GPU run fills it each
file has no sections and every lookup misses, which changes nothing but the seed of the ``fast``
policy (see ``tuning/__init__.py``). A document::

    {"schema": 1, "arch": "sm90",
     "measured_on": {"device": ..., "triton": ..., "torch": ..., "date": ...},
     "exported": ["8192x768x3072 bf16 none", ...],        # the problems --export finished
     "tuners": {name: {"source_hash": ..., "entries": {key text: config entry}}},
     "paths":  {op:   {"source_hash": ..., "entries": {key text: path entry}}}}

with config entries ``{"kwargs": {...}, "num_warps": 8, "num_stages": 3, "ms": 0.41}`` and path
entries ``{"path": "composed", "ms": 0.39, "candidates": {"fused": 0.41, "composed": 0.39}}``
(``null`` for a candidate that failed). A section counts only while its ``source_hash`` is the
chooser's own (the rule of the cache files): an entry for a kernel edited since the export is
ignored, never trusted.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

from .cache import write_document

SCHEMA = 1
SECTIONS = ("tuners", "paths")
TABLE_DIR = Path(__file__).with_name("tuned")


def table_path(arch: str) -> Path:
    return TABLE_DIR / f"{arch}.json"


def empty_table(arch: str) -> dict:
    return {"schema": SCHEMA, "arch": arch, "measured_on": {}, "exported": [],
            "tuners": {}, "paths": {}}


@functools.lru_cache(maxsize=32)
def _read(path: str, mtime_ns: int) -> dict:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) and not schema_problems(document) else {}


def read_table(path: Path) -> dict:
    """A table document read afresh ({} if missing, unreadable or malformed)."""
    try:
        return copy.deepcopy(_read(str(path), path.stat().st_mtime_ns))
    except OSError:
        return {}


def load_table(arch: str | None) -> dict:
    """The table of ``arch`` ({} if there is none, or it is unreadable or malformed)."""
    if arch is None:
        return {}
    path = table_path(arch)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    return _read(str(path), mtime)


def section_entries(arch: str | None, section: str, name: str, source_hash: str) -> dict:
    """The entries the table holds for chooser ``name``, if its source hash is current."""
    part = load_table(arch).get(section, {}).get(name)
    if not part or part.get("source_hash") != source_hash:
        return {}
    return part["entries"]


# ---- the schema --------------------------------------------------------------------------------


def _is_ms(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and not math.isnan(value))


def _config_problems(entry: object) -> list[str]:
    if not isinstance(entry, dict):
        return ["is not an object"]
    problems = []
    kwargs = entry.get("kwargs")
    if not isinstance(kwargs, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in kwargs.items()):
        problems.append("kwargs must map names to integers")
    for field in ("num_warps", "num_stages"):
        if not isinstance(entry.get(field), int) or isinstance(entry.get(field), bool):
            problems.append(f"{field} must be an integer")
    if not _is_ms(entry.get("ms")):
        problems.append("ms must be a number or null")
    return problems


def _path_problems(entry: object) -> list[str]:
    if not isinstance(entry, dict):
        return ["is not an object"]
    problems = []
    candidates = entry.get("candidates")
    if not isinstance(entry.get("path"), str):
        problems.append("path must be a string")
    if not isinstance(candidates, dict) or not all(_is_ms(v) for v in candidates.values()):
        problems.append("candidates must map path names to ms or null")
    elif entry.get("path") not in candidates:
        problems.append("the chosen path must be one of the candidates")
    if not _is_ms(entry.get("ms")):
        problems.append("ms must be a number or null")
    return problems


def schema_problems(document: dict) -> list[str]:
    """What is wrong with a table document ([] if nothing)."""
    problems = []
    if document.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA}, got {document.get('schema')!r}")
    if not isinstance(document.get("arch"), str):
        problems.append("arch must be a string")
    if not isinstance(document.get("exported", []), list):
        problems.append("exported must be a list")
    check = {"tuners": _config_problems, "paths": _path_problems}
    for section in SECTIONS:
        parts = document.get(section)
        if not isinstance(parts, dict):
            problems.append(f"{section} must be an object")
            continue
        for name, part in parts.items():
            if not isinstance(part, dict) or not isinstance(part.get("source_hash"), str) \
                    or not isinstance(part.get("entries"), dict):
                problems.append(f"{section}.{name} needs source_hash (str) and entries (object)")
                continue
            for key_text, entry in part["entries"].items():
                problems += [f"{section}.{name}[{key_text}]: {p}" for p in check[section](entry)]
    return problems


# ---- the nearest entry: where the fast policy starts when the problem has none of its own ------


def _sizes_and_rest(key_text: str) -> tuple[list[int], list[str]]:
    """The integer fields of a key text (the sizes) and the others (dtype, flags)."""
    sizes, rest = [], []
    for part in key_text.split("|"):
        if part.isdigit():
            sizes.append(int(part))
        else:
            rest.append(part)
    return sizes, rest


def key_distance(a: str, b: str) -> float:
    """Sum of |log2| ratios of the sizes of two key texts; infinite when any other field (dtype,
    GELU form, flags) differs."""
    sizes_a, rest_a = _sizes_and_rest(a)
    sizes_b, rest_b = _sizes_and_rest(b)
    if rest_a != rest_b or len(sizes_a) != len(sizes_b):
        return math.inf
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(sizes_a, sizes_b))


def nearest(entries: dict, key_text: str) -> dict | None:
    """The entry of ``entries`` whose key is nearest to ``key_text`` (None if none compares)."""
    best, best_distance = None, math.inf
    for text, entry in entries.items():
        distance = key_distance(text, key_text)
        if distance < best_distance:
            best, best_distance = entry, distance
    return best


# ---- writing (the exporter) ----------------------------------------------------------------------


def merge_section(document: dict, section: str, name: str, source_hash: str,
                  entries: dict) -> None:
    """Add ``entries`` to a table document; a section of an older source hash is replaced."""
    part = document.setdefault(section, {}).get(name)
    if not part or part.get("source_hash") != source_hash:
        part = document[section][name] = {"source_hash": source_hash, "entries": {}}
    part["entries"].update(entries)


def write_table(path: Path, document: dict) -> None:
    problems = schema_problems(document)
    if problems:
        raise ValueError(f"not writing a malformed tuning table {path}: {problems[:5]}")
    write_document(path, document)
