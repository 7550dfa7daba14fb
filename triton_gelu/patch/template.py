"""Proof by code: a function compiles to the same bytecode as a template, instruction for
instruction, up to the names of its locals and of the attributes named by role; every other name,
constant and global must be the same (a global may instead pass a rule given for it)."""

from __future__ import annotations

import builtins
import dis
import types

_SKIP = {"RESUME", "NOP", "CACHE", "EXTENDED_ARG", "NOT_TAKEN"}
_LOCALS = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "STORE_FAST",
           "LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW", "STORE_FAST_LOAD_FAST",
           "STORE_FAST_STORE_FAST"}
_ATTRS = {"LOAD_ATTR", "LOAD_METHOD"}


def _instructions(fn: types.FunctionType) -> list[dis.Instruction]:
    return [ins for ins in dis.get_instructions(fn) if ins.opname not in _SKIP]


def _bind(mapping: dict, key: str, value: str) -> bool:
    """Extend a one-to-one name mapping; False if it would map a name to two, or two to one."""
    if key in mapping:
        return mapping[key] == value
    if value in mapping.values():
        return False
    mapping[key] = value
    return True


def _global(fn: types.FunctionType, name: str) -> object:
    return fn.__globals__.get(name, getattr(builtins, name, None))


def match_template(fn: object, template: types.FunctionType, roles_named: tuple = (),
                   global_rules: dict | None = None) -> dict[str, str] | None:
    """Role -> child name when ``fn`` is ``template`` up to local and role names (the attribute
    names in ``roles_named``), else None. A global named in ``global_rules`` is accepted when its
    rule (a predicate on ``fn``'s global) holds, instead of being the template's very object."""
    if not isinstance(fn, types.FunctionType):
        return None
    code, want = fn.__code__, template.__code__
    if code.co_freevars or code.co_cellvars or fn.__defaults__ or fn.__kwdefaults__:
        return None
    # The low 16 bits are the code's own flags (varargs, generator...); above them are the
    # ``from __future__`` flags of the module it was written in, which do not change the code.
    if (code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount,
            code.co_flags & 0xFFFF) != (want.co_argcount, want.co_kwonlyargcount,
                                        want.co_posonlyargcount, want.co_flags & 0xFFFF):
        return None
    ours, theirs = _instructions(template), _instructions(fn)
    if len(ours) != len(theirs):
        return None
    local_names = dict(zip(want.co_varnames[:want.co_argcount], code.co_varnames))
    roles: dict[str, str] = {}
    for a, b in zip(ours, theirs):
        if a.opname != b.opname:
            return None
        if a.opname in _LOCALS:
            pairs = zip(*(v if isinstance(v, tuple) else (v,) for v in (a.argval, b.argval)))
            if not all(_bind(local_names, x, y) for x, y in pairs):
                return None
        elif a.opname in _ATTRS and a.argval in roles_named:
            if not _bind(roles, a.argval, b.argval) or _null_bit(a) != _null_bit(b):
                return None
        elif a.opname == "LOAD_GLOBAL":
            if a.argval != b.argval or _null_bit(a) != _null_bit(b):
                return None
            rule = (global_rules or {}).get(a.argval)
            if rule is not None:
                if not rule(_global(fn, b.argval)):
                    return None
            elif _global(fn, b.argval) is not _global(template, a.argval):
                return None
        elif a.argval != b.argval or (a.opname in _ATTRS and _null_bit(a) != _null_bit(b)):
            return None
    return roles


def _null_bit(ins: dis.Instruction) -> int:
    # LOAD_GLOBAL (3.11+) and LOAD_ATTR (3.12+) say in their lowest bit whether they also push
    # NULL for a call: the same name loaded as a value or as a callee is different code.
    return (ins.arg or 0) & 1
