"""What the ops' declarations (``ops/<op>.py``) hand to the parts of the package that must not
import them (``_dtensor_rules.py``: the ops import its caller, so importing them back would close
an import circle). Imports nothing."""

from __future__ import annotations

from collections.abc import Callable

# Each op's ``sharding_rules(layouts) -> {custom op: rule}``, in the order the ops were imported.
sharding_rules: list[Callable] = []


def declare_sharding_rules(rules: Callable) -> Callable:
    """Decorator: the op's DTensor sharding rules, registered on the first DTensor."""
    sharding_rules.append(rules)
    return rules
