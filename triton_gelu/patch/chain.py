"""Which children a module applies to its input, in which order, read off its code.

- ``nn.Sequential`` (and subclasses that keep its ``forward``): its children, in order;
- any other module whose ``forward`` is a plain chain ``x = self.a(x); x = self.b(x); ...;
  return x`` (or the nested ``self.b(self.a(x))``, or a mix): the chain is read off the bytecode
  of ``forward`` and only accepted when it is nothing else;
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: the chain of ``_ff_block``.
"""

from __future__ import annotations

import dis
import inspect
import sys

from torch import nn


def application_chain(module: nn.Module) -> list[str] | None:
    """Names of the children ``module`` applies to its input one after the other, or None when
    its forward is not (provably) such a chain."""
    if "forward" in vars(module):  # a forward replaced on the instance: we cannot read it
        return None
    cls = type(module)
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return [name for name, child in module._modules.items() if child is not None]
    if cls in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        # forward applies linear1/activation only through _ff_block (its fast path reads
        # linear1's parameters, which LinearGELU keeps).
        return None if "_ff_block" in vars(module) else call_chain(cls._ff_block)
    return call_chain(cls.forward)


class _Value:
    """A symbolic value of the bytecode walk: self, the input, NULL, self.<name>, a call."""

    def __init__(self, kind: str, name: str | None = None, arg: _Value | None = None) -> None:
        self.kind, self.name, self.arg = kind, name, arg


_SELF, _INPUT, _NULL = _Value("self"), _Value("input"), _Value("null")
_SKIP = {"RESUME", "NOP", "PRECALL", "CACHE", "EXTENDED_ARG", "NOT_TAKEN"}
_LOAD_FAST = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"}
_LOAD_FAST_2 = {"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"}
_CALL_2 = {"CALL", "CALL_METHOD"}  # callable + NULL (either order) below the arguments
_NOT_PLAIN = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)


def call_chain(fn: object) -> list[str] | None:
    """If ``fn(self, x)`` is exactly ``return self.aN(...self.a1(self.a0(x)))`` (as nested calls,
    one ``x = self.ai(x)`` per line, or a mix), return ``[a0, ..., aN]``; else None.

    Read from the bytecode with a small symbolic stack machine: any instruction outside the few
    that such a chain compiles to (on Python 3.10 to 3.13) makes the answer None, so a forward
    that does anything else (arithmetic, a residual, keyword arguments, a branch) is refused.
    """
    code = getattr(fn, "__code__", None)
    if code is None or code.co_argcount < 2 or code.co_cellvars or code.co_freevars:
        return None
    if code.co_flags & _NOT_PLAIN:
        return None
    env = {code.co_varnames[0]: _SELF, code.co_varnames[1]: _INPUT}
    stack: list[_Value] = []
    try:
        for ins in dis.get_instructions(code):
            op = ins.opname
            if op in _SKIP:
                continue
            if op in _LOAD_FAST:
                stack.append(env[ins.argval])
            elif op in _LOAD_FAST_2:
                stack.extend(env[name] for name in ins.argval)
            elif op == "STORE_FAST":
                env[ins.argval] = stack.pop()
            elif op == "STORE_FAST_LOAD_FAST":
                store, load = ins.argval
                env[store] = stack.pop()
                stack.append(env[load])
            elif op in ("LOAD_ATTR", "LOAD_METHOD"):
                if stack.pop() is not _SELF:
                    return None
                is_method = op == "LOAD_METHOD" or (sys.version_info >= (3, 12) and ins.arg & 1)
                stack.extend([_NULL, _Value("attr", ins.argval)] if is_method
                             else [_Value("attr", ins.argval)])
            elif op == "PUSH_NULL":
                stack.append(_NULL)
            elif op in _CALL_2 or op == "CALL_FUNCTION":
                if ins.arg != 1:
                    return None
                arg = stack.pop()
                below = [stack.pop(), stack.pop()] if op in _CALL_2 else [_NULL, stack.pop()]
                attrs = [v for v in below if v.kind == "attr"]
                if arg.kind not in ("input", "call") or len(attrs) != 1 or _NULL not in below:
                    return None
                stack.append(_Value("call", attrs[0].name, arg))
            elif op == "RETURN_VALUE":
                result = stack.pop()
                break
            else:
                return None
        else:
            return None
    except (KeyError, IndexError):  # an unknown local, a stack underflow: not a chain
        return None
    if stack:
        return None
    chain: list[str] = []
    value: _Value | None = result
    while value is not None and value.kind == "call" and value.name is not None:
        chain.append(value.name)
        value = value.arg
    return chain[::-1] if value is _INPUT and chain else None
