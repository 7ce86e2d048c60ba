"""Bad input for the fuzz tests: protobuf messages of any type with boundary values.

`messages(descriptor)` builds a message of the descriptor's type with a random
subset of its fields set, every value drawn from boundaries and random values of
the field's type: empty and over-long strings, NaN and infinities, integer
extremes, enum numbers the enum does not define, timestamps outside every range,
repeated fields with 1001 elements. It works from the descriptor alone, so a new
field or message is covered without touching this file.

`nested(levels)` is protobuf nested past the parser's recursion limit.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from bench.workload import varint
from shared.envelopes import utc_now

#: Hypothesis examples per fuzzed endpoint: CARGOTRACK_FUZZ_EXAMPLES, else 300 for the
#: full run (CARGOTRACK_FAULTS_FULL=1), else 25.
FUZZ_EXAMPLES = int(
    os.environ.get("CARGOTRACK_FUZZ_EXAMPLES")
    or (300 if os.environ.get("CARGOTRACK_FAULTS_FULL") == "1" else 25)
)

_F = FieldDescriptor

#: Ids and texts at and over the limits, and odd characters.
BOUNDARY_TEXT = [
    "",
    " ",
    "veh-fuzz",
    "shp-fuzz",
    "a" * 128,
    "a" * 129,
    "x" * 1024,
    "x" * 1025,
    "\x00\x01\x7f",
    "évènement 🚚",
    "🚚" * 300,
    "1.5e308",
    "' OR 1=1 --",
    "-" * 300_000,
]


def texts(*, nul: bool = True, longest: int | None = None) -> st.SearchStrategy[str]:
    """Boundary strings and random text (`nul=False`: without U+0000; `longest`: no
    string longer)."""
    boundary = [
        t
        for t in BOUNDARY_TEXT
        if (nul or "\x00" not in t) and (longest is None or len(t) <= longest)
    ]
    exclude = "" if nul else "\x00"
    return st.one_of(
        st.sampled_from(boundary),
        st.text(st.characters(codec="utf-8", exclude_characters=exclude), max_size=40),
    )


_DOUBLE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 90.0, -90.0, 90.000001, 180.0, -180.000001, 1e308, 5e-324]),
)
_FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, -1, 2, 1000, 1001, 500, 501) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_TIMESTAMP_SECONDS = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            946684799,  # 1999-12-31T23:59:59Z
            4102444800,  # 2100-01-01
            253402300800,  # past year 9999
            -62135596801,  # before year 1
            2**63 - 1,
            -(2**63),
        ]
    ),
    st.integers(-(2**63), 2**63 - 1),
    # Near now: valid, or just too far in the future.
    st.integers(-3600, 3600).map(lambda d: int(utc_now().timestamp()) + d),
)
_TIMESTAMP_NANOS = st.one_of(
    st.sampled_from([0, 999_999_999, 10**9, -1]), st.integers(-(2**31), 2**31 - 1)
)


@st.composite
def messages(
    draw: st.DrawFn,
    descriptor: Descriptor,
    depth: int = 0,
    *,
    nul: bool = True,
    longest: int | None = None,
) -> Message:
    """A message of the type with some fields set to boundary or random values."""
    message = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Timestamp":
        message.seconds = draw(_TIMESTAMP_SECONDS)  # type: ignore[attr-defined]
        message.nanos = draw(_TIMESTAMP_NANOS)  # type: ignore[attr-defined]
        return message
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        value = _value(field, depth, nul, longest)
        if value is None:
            continue
        if field.is_repeated:
            count = draw(st.sampled_from([0, 1, 2, 3, 1001]))
            # Over 3: many copies of one element, cheap to build, over every count limit.
            items = [draw(value)] * count if count > 3 else [draw(value) for _ in range(count)]
            container = getattr(message, field.name)
            if field.type == _F.TYPE_MESSAGE:
                for item in items:
                    container.add().CopyFrom(item)
            else:
                container.extend(items)
        elif field.type == _F.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(value))
        else:
            setattr(message, field.name, draw(value))
    return message


def _value(
    field: FieldDescriptor, depth: int, nul: bool, longest: int | None
) -> st.SearchStrategy[Any] | None:
    kind = field.type
    if kind == _F.TYPE_STRING:
        return texts(nul=nul, longest=longest)
    if kind == _F.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind == _F.TYPE_DOUBLE:
        return _DOUBLE
    if kind == _F.TYPE_FLOAT:
        return _FLOAT
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == _F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(-(2**31), 2**31 - 1))
    if kind == _F.TYPE_MESSAGE:
        if depth >= 4:
            return None
        assert field.message_type is not None
        return messages(field.message_type, depth + 1, nul=nul, longest=longest)
    return None


def nested(levels: int) -> bytes:
    """Field 1, length-delimited, nested `levels` deep (past protobuf's recursion limit)."""
    raw = b""
    for _ in range(levels):
        raw = b"\x0a" + varint(len(raw)) + raw
    return raw
