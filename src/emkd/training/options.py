"""Recipe values in the types their declarations ask for: one rule for the recipe's keys (the fields of
:class:`emkd.training.config.TrainConfig`) and for a method's loss options (the parameters of its loss).

YAML reads ``1e-3`` as a string and ``0`` as an int; a recipe says ``max_steps: 1.5`` or ``loss.alpha: abc``. Each
value is taken in its declared type where that is unambiguous (``"1e-3"`` -> ``1e-3`` for a float, ``0`` -> ``0.0``)
and refused otherwise, with the key named: ``max_steps must be int, got 1.5``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

_SIMPLE = (bool, int, float, str)


def typed_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` asks: ``bool``, ``int``, ``float``, ``str``, another plain class such as ``dict``
    (checked, not converted), each optionally ``| None``; other annotations (generics, tensors) pass unchecked.

    Raises ``ValueError`` naming ``key``, what it must be and what it got.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(annotation)) if is_union else {annotation}
    optional = type(None) in allowed
    allowed.discard(type(None))
    if value is None and optional:
        return None
    if not all(isinstance(t, type) for t in allowed):
        return value  # a generic such as tuple[str, ...]: not something a recipe sets
    simple = allowed & set(_SIMPLE)
    if allowed - simple:  # plain classes (dict): the value must be one of them
        if simple or isinstance(value, tuple(allowed)):
            return value
    elif isinstance(value, bool):
        if bool in simple:
            return value
    elif isinstance(value, int) and (int in simple or float in simple):
        return value if int in simple else float(value)
    elif isinstance(value, float) and float in simple:
        return value
    elif isinstance(value, str):
        if str in simple:
            return value
        for kind in (int, float):  # YAML reads 1e-3 as a string
            if kind in simple:
                try:
                    return kind(value)
                except ValueError:
                    pass
    names = " or ".join(t.__name__ for t in [*(t for t in _SIMPLE if t in simple), *(allowed - simple)])
    raise ValueError(f"{key} must be {names}{' or null' if optional else ''}, got {value!r}")


def type_fields(instance: Any, prefix: str = "") -> None:
    """Replace every field of the dataclass ``instance`` by :func:`typed_value` of it (keys named ``PREFIX + name``)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        typed = typed_value(f"{prefix}{f.name}", value, hints[f.name])
        if typed is not value:
            setattr(instance, f.name, typed)


__all__ = ["type_fields", "typed_value"]
