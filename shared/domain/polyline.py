"""Google's Encoded Polyline Algorithm Format: decode and encode.

Format: each coordinate is scaled by ``10**precision`` and rounded (half away from
zero); the first point is written as is and every later one as the difference from the
previous *rounded* point, so rounding never accumulates. Each signed integer is
zig-zagged (``v << 1``, inverted when negative), cut into 5-bit chunks from the least
significant end, each chunk but the last or'ed with 0x20, and written as
``chr(chunk + 63)``. Points are ``(lat, lon)``; precision 5 is Google's, 6 is OSRM's
and Valhalla's.

Hand-written (about 40 lines) rather than a dependency: planned routes arrive from
outside systems, so :func:`decode` validates strictly and says where a string is bad
(``PolylineError``, a ``ValueError``), which the common packages do not do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_MIN_CHAR = 63
_MAX_CHAR = 63 + 0x3F
_MAX_CHUNKS = 7  # 35 bits: enough for 180 * 10**7 zig-zagged, far below any misuse


class PolylineError(ValueError):
    """A malformed encoded polyline; the message names the character offset."""


def _check_precision(precision: int) -> int:
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= 7:
        raise ValueError(f"precision must be an int in [0, 7], got {precision!r}")
    factor: int = 10**precision
    return factor


def _round_half_away(value: float) -> int:
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _write(out: list[str], value: int) -> None:
    v = ~(value << 1) if value < 0 else value << 1
    while v >= 0x20:
        out.append(chr((0x20 | (v & 0x1F)) + _MIN_CHAR))
        v >>= 5
    out.append(chr(v + _MIN_CHAR))


def encode(points: Iterable[tuple[float, float]], precision: int = 5) -> str:
    """Encode ``(lat, lon)`` points (degrees). An empty input encodes to ``""``.

    Raises ``ValueError`` for a non-finite or out-of-range coordinate.
    """
    factor = _check_precision(precision)
    out: list[str] = []
    prev_lat = prev_lon = 0
    for lat, lon in points:
        if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
            raise ValueError(f"latitude out of range: {lat!r}")
        if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
            raise ValueError(f"longitude out of range: {lon!r}")
        ilat = _round_half_away(lat * factor)
        ilon = _round_half_away(lon * factor)
        _write(out, ilat - prev_lat)
        _write(out, ilon - prev_lon)
        prev_lat, prev_lon = ilat, ilon
    return "".join(out)


def decode(encoded: str, precision: int = 5) -> list[tuple[float, float]]:
    """Decode to ``(lat, lon)`` points (degrees). ``""`` decodes to ``[]``.

    Raises :class:`PolylineError` for a character outside ``'?'..'~'``, a value cut
    short, an odd number of values, an over-long value, or a point out of range.
    """
    factor = _check_precision(precision)
    values: list[int] = []
    result = shift = chunks = 0
    for i, ch in enumerate(encoded):
        b = ord(ch)
        if not _MIN_CHAR <= b <= _MAX_CHAR:
            raise PolylineError(f"invalid character {ch!r} at offset {i}")
        b -= _MIN_CHAR
        result |= (b & 0x1F) << shift
        shift += 5
        chunks += 1
        if chunks > _MAX_CHUNKS:
            raise PolylineError(f"value too long at offset {i}")
        if b < 0x20:
            values.append(~(result >> 1) if result & 1 else result >> 1)
            result = shift = chunks = 0
    if chunks:
        raise PolylineError(f"truncated value at offset {len(encoded)}")
    if len(values) % 2:
        raise PolylineError("odd number of values: a latitude without a longitude")
    points: list[tuple[float, float]] = []
    lat = lon = 0
    for k in range(0, len(values), 2):
        lat += values[k]
        lon += values[k + 1]
        plat, plon = lat / factor, lon / factor
        if not (-90.0 <= plat <= 90.0 and -180.0 <= plon <= 180.0):
            raise PolylineError(f"point {k // 2} out of range: ({plat}, {plon})")
        points.append((plat, plon))
    return points
