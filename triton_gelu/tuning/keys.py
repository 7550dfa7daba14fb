"""What a choice is keyed on: the device (and its architecture), the kernel's source, the problem
key and its text form in the JSON files."""

from __future__ import annotations

import hashlib
import inspect
import re
import types
from dataclasses import dataclass

import torch
import triton.language as tl

_ARCH_OF_CAPABILITY = {(9, 0): "sm90", (8, 0): "sm80", (8, 6): "sm86", (8, 9): "sm89"}


def arch_of(capability: tuple[int, int], hip: bool = False) -> str:
    """The config-space name of a CUDA compute capability ("default" for ROCm and the rest)."""
    return "default" if hip else _ARCH_OF_CAPABILITY.get(tuple(capability), "default")


def _python_fn(obj):
    """The Python function under a ``@triton.jit`` object (JIT or interpreted, possibly wrapped
    by triton.autotune / heuristics), else None."""
    if not hasattr(obj, "arg_names"):
        return None
    while not isinstance(obj, types.FunctionType) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj if isinstance(obj, types.FunctionType) else None


def source_hash(kernel) -> str:
    """sha256 of the kernel's source and, transitively, of every @triton.jit helper it calls and
    every constexpr global it reads (looked up by name, also one module attribute deep)."""
    digest, seen = hashlib.sha256(), set()

    def visit(fn: types.FunctionType) -> None:
        if fn in seen:
            return
        seen.add(fn)
        try:
            digest.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source file: fall back to the bytecode
            digest.update(fn.__code__.co_code)
        names = fn.__code__.co_names
        for name in names:
            value = fn.__globals__.get(name)
            targets = [value]
            if isinstance(value, types.ModuleType):
                targets = [getattr(value, attr, None) for attr in names]
            for target in targets:
                inner = _python_fn(target)
                if inner is not None:
                    visit(inner)
                elif target is value and isinstance(value, tl.constexpr):
                    digest.update(f"{name}={value.value!r}".encode())

    visit(_python_fn(kernel) or kernel)
    return digest.hexdigest()


@dataclass(frozen=True)
class Device:
    """What the tuner needs to know about the device a launch runs on."""

    index: int  # -1: the Triton interpreter
    name: str
    arch: str | None


_devices: dict[int, Device] = {}


def device_of(index: int) -> Device:
    """Describe CUDA device ``index`` (queried once, at the first launch on it)."""
    device = _devices.get(index)
    if device is None:
        if index < 0:
            device = Device(index, "interpreter", None)
        else:
            capability = torch.cuda.get_device_capability(index)
            arch = arch_of(capability, hip=torch.version.hip is not None)
            device = Device(index, torch.cuda.get_device_name(index), arch)
        _devices[index] = device
    return device


def key_string(key: tuple) -> str:
    """A stable text form of a key for the JSON cache: ``8192|torch.bfloat16|False``."""
    return "|".join(str(k) for k in key)


_KEY_WORDS = {"True": True, "False": False, "None": None}


def parse_key(text: str) -> tuple:
    """The key a ``key_string`` text stands for (sizes, torch dtypes, flags, strings)."""
    def field(part: str):
        if part.isdigit():
            return int(part)
        if part in _KEY_WORDS:
            return _KEY_WORDS[part]
        dtype = getattr(torch, part.removeprefix("torch."), None) if part.startswith("torch.") \
            else None
        return dtype if isinstance(dtype, torch.dtype) else part
    return tuple(field(part) for part in text.split("|"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "device"
