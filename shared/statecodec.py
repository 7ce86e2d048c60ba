"""JSON for the folds' frozen dataclasses, driven by their type hints.

The projector stores each fold state as jsonb and loads it back before the next
batch; `decode(Type, encode(state)) == state` for every state the folds build.
Supported field types: str, int, float, bool, None, datetime (tz-aware, stored
as ISO 8601), nested frozen dataclasses, `X | None`, `tuple[X, ...]`, fixed
tuples, and `frozenset[X]` (stored sorted, so equal states give equal JSON).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


def encode(value: Any) -> Any:
    """A JSON-compatible value for a state (see the module docstring for types)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, frozenset):
        return sorted(encode(item) for item in value)
    if isinstance(value, tuple | list):
        return [encode(item) for item in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(kind: Any, data: Any) -> Any:
    """Rebuild a value of type `kind` from what encode() produced."""
    if data is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported union {kind}")
        return decode(options[0], data)
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], item) for item in data)
        return tuple(decode(arg, item) for arg, item in zip(args, data, strict=True))
    if origin is frozenset:
        (item_kind,) = typing.get_args(kind)
        return frozenset(decode(item_kind, item) for item in data)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = _hints(kind)
        return kind(
            **{
                f.name: decode(hints[f.name], data[f.name])
                for f in dataclasses.fields(kind)
                if f.name in data
            }
        )
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(data)
    if kind is datetime:
        return datetime.fromisoformat(data)
    if kind is float:
        return float(data)
    # str, int, bool, enum value types (NewType-like aliases of int) pass through.
    return data


def decode_as(cls: type[T], data: Any) -> T:
    """decode() with the result typed as cls."""
    result: T = decode(cls, data)
    return result
