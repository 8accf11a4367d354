"""Check a config value against its type annotation, converting command-line strings.

``coerce(value, annotation)`` returns the value (converted where a string from the command line
stands for a number or a boolean) or raises ``ValueError`` saying what was expected. ``init_fields``
names the fields of a config dataclass that a user sets.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from sftrainer.errors import did_you_mean

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, annotation: Any) -> Any:
    """Check ``value`` against a type annotation, converting strings from the command line."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and value is False and "no" in {m.value for m in enums[0]}:
            value = "no"  # YAML 1.1 reads an unquoted `no` (eval_strategy: no) as false
        if enums and str in args and isinstance(value, str):
            # TrainingArguments turns these strings into the enum; check here to name the key.
            coerce(value, enums[0])
            return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(
            errors[0] if len(errors) == 1 else f"expected {_type_name(annotation)}, got {value!r}"
        )
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"must be one of {list(args)}, got {value!r}")
    if value is None:
        raise ValueError(f"expected {_type_name(annotation)}, got null")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            choices = [m.value for m in annotation]
            raise ValueError(
                f"must be one of {choices}, got {value!r}{did_you_mean(str(value), map(str, choices))}"
            ) from None
    if origin in (list, Sequence) or annotation is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, args[0]) for v in value] if args else value
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return value
    return value


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args) or str(annotation)


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of config dataclass ``cls`` a user sets: constructor arguments, not private ones."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
