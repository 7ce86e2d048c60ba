"""Resume tokens: where in the alerts topic a subscriber's stream stands.

A token is the vector of per-partition *next offsets* of the alerts topic after
the alert it was sent with: every record below those offsets has been considered
for the subscriber (sent, or filtered out), nothing at or above them has. It does
not depend on the filter or the tenant, so a client may resume with another filter,
and a token reveals nothing but offsets.

Wire form (opaque to clients): base64url without padding of

    version (1 byte, = 1) | partition count (varint) | next offset of each
    partition, in partition order (varints) | CRC-32 of everything before (4 bytes)

The checksum turns a truncated or hand-edited token into a clear INVALID_ARGUMENT
instead of a stream that silently starts somewhere else.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Sequence

VERSION = 1
#: Far more than any alerts topic has; bounds the work a hostile token can cause.
MAX_PARTITIONS = 10_000
#: Tokens longer than this cannot be valid (10,000 partitions of 10-byte varints).
MAX_TOKEN_CHARS = 140_000

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


class ResumeTokenError(ValueError):
    """The token is not one this service issued (the message says why)."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if at >= len(data):
            raise ResumeTokenError("truncated")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ResumeTokenError("offset out of range")


def encode(offsets: Sequence[int]) -> str:
    """The token for these next offsets (index = partition number)."""
    body = bytes([VERSION]) + _varint(len(offsets)) + b"".join(_varint(o) for o in offsets)
    raw = body + zlib.crc32(body).to_bytes(4, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(token: str) -> tuple[int, ...]:
    """The next offsets a token holds; ResumeTokenError when it is malformed.

    Checks the form only (alphabet, version, checksum, lengths); whether the
    offsets fit the topic is the caller's check.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise ResumeTokenError("too long")
    if not _ALPHABET.fullmatch(token) or len(token) % 4 == 1:
        raise ResumeTokenError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise ResumeTokenError("not base64url") from None
    if len(raw) < 6:
        raise ResumeTokenError("truncated")
    body, checksum = raw[:-4], raw[-4:]
    if zlib.crc32(body).to_bytes(4, "big") != checksum:
        raise ResumeTokenError("checksum mismatch (truncated or altered)")
    if body[0] != VERSION:
        raise ResumeTokenError(f"unknown version {body[0]}")
    count, at = _read_varint(body, 1)
    if count == 0 or count > MAX_PARTITIONS:
        raise ResumeTokenError(f"invalid partition count {count}")
    offsets = []
    for _ in range(count):
        offset, at = _read_varint(body, at)
        offsets.append(offset)
    if at != len(body):
        raise ResumeTokenError("trailing bytes")
    return tuple(offsets)
