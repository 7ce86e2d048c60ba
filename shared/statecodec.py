"""JSON for the folds' frozen dataclasses, driven by their type hints.

The projector stores each fold state as jsonb and loads it back before the next
batch; `decode(Type, encode(state)) == state` for every state the folds build.
Supported field types: str, int, float, bool, None, datetime (tz-aware, stored
as ISO 8601), nested frozen dataclasses, `X | None`, `tuple[X, ...]`, fixed
tuples, and `frozenset[X]` (stored sorted, so equal states give equal JSON).

A dataclass field with ``init=False`` is derived from the others and not stored.
Two keys of a field's metadata keep older stored data readable when a type changes
(shared.domain.geo.Fix uses both):

* ``json_key``: the key the field is stored under, when it differs from its name
  (a field renamed in code keeps its stored key, and SQL that reads it);
* ``zero_is_none``: a stored ``0`` decodes as ``None`` (an optional field whose older
  stored form used 0 for "unknown").
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


def encode(value: Any) -> Any:
    """A JSON-compatible value for a state (see the module docstring for types)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: encode(getattr(value, name)) for name, key in _stored(type(value))}
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


@functools.cache
def _stored(cls: type) -> tuple[tuple[str, str], ...]:
    """(field name, stored key) of each stored field of a dataclass, in field order."""
    return tuple(
        (f.name, f.metadata.get("json_key", f.name)) for f in dataclasses.fields(cls) if f.init
    )


def decode(kind: Any, data: Any) -> Any:
    """Rebuild a value of type `kind` from what encode() produced."""
    if data is None:
        return None
    return _decoder(kind)(data)


_Decoder = Callable[[Any], Any]


def _identity(data: Any) -> Any:
    return data


@functools.cache
def _decoder(kind: Any) -> _Decoder:
    """A function doing what decode(kind, data) does for a non-None `data`.

    Built once per type from its hints and cached: the projector decodes thousands
    of states per poll batch and the query service one per request, and walking the
    type hints on every call cost far more than building the values.
    """
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported union {kind}")
        return _decoder_of(options[0])
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder_of(args[0])
            return lambda data: tuple([item(x) for x in data])
        items = [_decoder_of(arg) for arg in args]
        return lambda data: tuple([f(x) for f, x in zip(items, data, strict=True)])
    if origin is frozenset:
        (item_kind,) = typing.get_args(kind)
        element = _decoder_of(item_kind)
        return lambda data: frozenset([element(x) for x in data])
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass_decoder(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind
    if kind is datetime:
        return datetime.fromisoformat
    if kind is float:
        return float
    # str, int, bool, enum value types (NewType-like aliases of int) pass through.
    return _identity


def _decoder_of(kind: Any) -> _Decoder:
    """decode(kind, ·) for possibly-None data, resolved on first use (so a type may
    refer to itself)."""
    resolved: list[_Decoder] = []

    def run(data: Any) -> Any:
        if data is None:
            return None
        if not resolved:
            resolved.append(_decoder(kind))
        return resolved[0](data)

    return run


def _zero_is_none(decoder: _Decoder) -> _Decoder:
    def run(data: Any) -> Any:
        return None if data == 0 else decoder(data)

    return run


def _dataclass_decoder(kind: type) -> _Decoder:
    hints = _hints(kind)
    fields = []
    for f in dataclasses.fields(kind):
        if not f.init:
            continue
        decoder = _decoder_of(hints[f.name])
        if f.metadata.get("zero_is_none"):
            decoder = _zero_is_none(decoder)
        fields.append((f.name, f.metadata.get("json_key", f.name), decoder))

    def run(data: Any) -> Any:
        return kind(**{name: field(data[key]) for name, key, field in fields if key in data})

    return run


def decode_as(cls: type[T], data: Any) -> T:
    """decode() with the result typed as cls."""
    result: T = decode(cls, data)
    return result
