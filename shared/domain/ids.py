"""Identifiers: time-ordered UUIDv7 for new facts, name-based UUIDv5 for re-derivable ones.

Two kinds of id, for two needs:

* :func:`uuid7` mints a fresh id for a fact the service creates (RFC 9562, version 7).
  Ids minted by one process sort in minting order, so they make good keys for
  append-mostly B-tree indexes and for "newest first" pagination.
* :func:`gps_batch_event_id` and :func:`alert_id` *derive* an id from what identifies
  the fact, so deriving it again (a client resending a batch, the projector replaying
  the log after a crash or during a rebuild) gives the same id, and the downstream
  dedupe by event id sees a duplicate instead of a new fact.

All ids are returned in the canonical lower-case 8-4-4-4-12 text form.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

#: The namespace of every name-based cargotrack id: ``uuid5(NAMESPACE_URL, "urn:cargotrack:v1")``.
#: Never change it: every derived id (and so every dedupe decision) depends on it.
CARGOTRACK_NAMESPACE = uuid.UUID("c67affa1-5bd5-5d47-872d-c94459ebe648")

_COUNTER_BITS = 42  # 12 bits of rand_a + the top 30 bits of rand_b (RFC 9562 §6.2, method 1)
_COUNTER_LIMIT = 1 << _COUNTER_BITS
_TIMESTAMP_MASK = (1 << 48) - 1

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def _counter_seed() -> int:
    # A random start in the lower half of the counter range: unpredictable, and leaves
    # at least 2**41 increments before a rollover within one millisecond.
    return int.from_bytes(os.urandom(6), "big") >> (48 - _COUNTER_BITS + 1)


def uuid7() -> str:
    """A new RFC 9562 version 7 UUID: 48-bit Unix milliseconds, then a counter, then random.

    Monotonic within the process, also across threads: each id is strictly greater
    than the previous one, even when several are minted in the same millisecond or the
    wall clock steps back (the last timestamp is then reused and the counter
    incremented). Across processes, ids are ordered to the millisecond. 73 bits are
    random per millisecond (41-bit random counter start + 32 random bits per id).
    """
    global _last_ms, _counter
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms, _counter = now_ms, _counter_seed()
        else:
            _counter += 1
            if _counter >= _COUNTER_LIMIT:  # 2**41 ids in one millisecond: borrow the next
                _last_ms, _counter = _last_ms + 1, _counter_seed()
        unix_ms, counter = _last_ms, _counter
    value = (unix_ms & _TIMESTAMP_MASK) << 80
    value |= 0x7 << 76  # version
    value |= (counter >> 30) << 64  # rand_a: the counter's top 12 bits
    value |= 0b10 << 62  # variant
    value |= (counter & ((1 << 30) - 1)) << 32  # rand_b, first 30 bits: the counter's rest
    value |= int.from_bytes(os.urandom(4), "big")  # rand_b, last 32 bits
    return str(uuid.UUID(int=value))


def uuid7_unix_ms(value: str) -> int:
    """The Unix time in milliseconds embedded in a UUIDv7; ``ValueError`` for another version."""
    parsed = uuid.UUID(value)
    if parsed.version != 7:
        raise ValueError(f"not a UUIDv7: {value}")
    return parsed.int >> 80


def _name(*parts: str) -> str:
    # Length-prefixed so that no two different tuples of parts give the same name,
    # whatever characters the parts contain (ids come from clients and tokens).
    return "".join(f"{len(part)}:{part}" for part in parts)


def gps_batch_event_id(tenant_id: str, device_id: str, sequence: int) -> str:
    """The event id of a GPS batch: the same (tenant, device, sequence) gives the same id.

    A device numbers its batches 1, 2, 3, ... and resends an unacknowledged batch
    with its sequence unchanged, so a resend gets the event id of the original.
    """
    name = _name("gps-batch", tenant_id, device_id, str(sequence))
    return str(uuid.uuid5(CARGOTRACK_NAMESPACE, name))


def alert_id(shipment_id: str, kind: int, episode: int | str, *, tenant_id: str = "") -> str:
    """A stable alert id: the same shipment, alert kind and episode give the same id.

    ``kind`` is the ``AlertKind`` number (stable, unlike names). ``episode`` tells apart
    successive alerts of one kind for one shipment, e.g. the event id of the input that
    revealed the change, or a per-shipment counter of condition changes; it must be
    derived from the log alone so that a replay reproduces it. Pass ``tenant_id`` when
    shipment ids are only unique per tenant (and then always pass it).
    """
    name = _name("alert", tenant_id, shipment_id, str(int(kind)), str(episode))
    return str(uuid.uuid5(CARGOTRACK_NAMESPACE, name))
