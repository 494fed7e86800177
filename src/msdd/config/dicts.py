"""Frozen dataclasses to and from plain dicts (YAML, JSON), with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from typing import Any, Literal


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Turn a YAML/JSON value into the declared field type, with errors naming the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"invalid config value for `{name}`: expected a mapping, got {value!r}")
        return from_dict(tp, value, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"invalid config value for `{name}`: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0]
        return tuple(_coerce(elem, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        return value
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"invalid config value for `{name}`: expected a number, got {value!r}")
        if not math.isfinite(value):  # no field takes inf or nan: a learning rate of .inf trains to NaN
            raise ValueError(f"invalid config value for `{name}`: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"invalid config value for `{name}`: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"invalid config value for `{name}`: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"invalid config value for `{name}`: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {sorted(map(str, unknown))} in {where}; valid keys: {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def diff_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two configs differ (used to refuse mismatched resumes)."""
    da, db = to_dict(a), to_dict(b)
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{p}.{k}" if p else k)
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y)):
            out.append(f"{p}: {x!r} -> {y!r}")

    walk(da, db, prefix)
    return out
