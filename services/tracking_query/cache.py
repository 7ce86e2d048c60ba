"""Encoded GetShipment and TrackByToken answers, kept in memory until their shipment changes.

Contract (docs/query.md, "Caching"): the cache never answers with a state older than
one that has been committed and notified. "Notified" means the change feed of this
process (services/tracking_query/watch.py) has taken the notification that
PostgreSQL's triggers send for the shipment. From that moment on:

1. Entries of the shipment are gone: `changed()` removes them when the notification
   is taken (before any watcher is woken).
2. No read that started earlier can put an answer back. A read takes a `ticket()`
   before it asks PostgreSQL and may `put()` its answer only if its shipment has not
   changed since the ticket; `changed()` stamps the shipment with a fresh number from
   one sequence, so a read holding an older ticket is refused. A read that starts
   after the notification sends its query after the commit, so it sees the change
   (a notification is delivered only once its transaction is visible).
3. While the feed does not listen, notifications may be lost: `lost()` empties the
   cache and turns it off (every call reads PostgreSQL); `listening()` turns it back on
   once LISTEN is established again, refusing the answers of reads that started
   before (they may have read a state whose change nobody was told about).

The stamps of changed shipments are kept for the most recent `RECENT_CHANGES`
shipments only; a shipment whose stamp was dropped counts as changed at the newest
dropped stamp (`_floor`), so forgetting makes a read's store refused, never allowed.

Keys say everything that decides an answer besides the shipment's rows: the RPC and
the caller's scope (tenant, and the customer for a customer token), or the tracking
token for the public view. One tenant's or one customer's answer is thus never
another's. Staff roles share a key because they get the same answer
(shared.domain.visibility has one staff audience).

Bounded: `max_bytes` counts each answer's encoded size plus an estimate of the
memory around it (`ENTRY_OVERHEAD_BYTES`, checked by tests/unit/test_query_cache.py);
the least recently used entries go first. `max_bytes=0` turns the cache off.
Negative answers (NOT_FOUND) are never cached.

Single-threaded: every method is called from the event loop, without awaiting, so
each is atomic with respect to the others.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from shared import metrics

#: Changed shipments whose change number is remembered (about 220 bytes each, so
#: about 2 MB, outside the bound).
#: Only reads in flight need them: a read started before the oldest remembered
#: change of its shipment cannot store its answer, which costs a later miss.
RECENT_CHANGES = 8192
#: Estimated memory of one entry besides its encoded answer: the key and its scope,
#: the entry record, the LRU and per-shipment index slots.
ENTRY_OVERHEAD_BYTES = 700

_HIT = metrics.QUERY_CACHE_LOOKUPS.labels("hit")
_MISS = metrics.QUERY_CACHE_LOOKUPS.labels("miss")
_BYPASS = metrics.QUERY_CACHE_LOOKUPS.labels("bypass")


class _Entry:
    __slots__ = ("shipment", "size", "value")

    def __init__(self, value: bytes, shipment: str, size: int) -> None:
        self.value = value
        self.shipment = shipment
        self.size = size


class ResponseCache:
    """Encoded answers by key, each belonging to one shipment (the change feed's key,
    `tenant:shipment`). Starts off: it serves nothing until `listening()`.
    See the module docstring for the contract."""

    def __init__(self, max_bytes: int, *, recent_changes: int = RECENT_CHANGES) -> None:
        if max_bytes < 0 or recent_changes < 1:
            raise ValueError("max_bytes must be >= 0 and recent_changes >= 1")
        self.max_bytes = max_bytes
        self._recent_changes = recent_changes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # oldest use first
        #: The keys of each shipment's answers (a list: usually one or two, and a
        #: list costs a third of a set's memory).
        self._by_shipment: dict[str, list[Hashable]] = {}
        self._bytes = 0
        self._sequence = 0
        #: Number of the last change of recently changed shipments, oldest first.
        self._changed_at: OrderedDict[str, int] = OrderedDict()
        #: Every shipment not in _changed_at counts as changed at this number.
        self._floor = 0
        self._listening = False

    # --- reads ------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True while answers are served and stored (on, and the feed listens)."""
        return self.max_bytes > 0 and self._listening

    @property
    def size_bytes(self) -> int:
        """The bytes counted against `max_bytes` (answers plus their overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> bytes | None:
        """The stored answer for `key`, or None (then read, after taking a `ticket()`)."""
        if not self.serving:
            _BYPASS.inc()
            return None
        entry = self._entries.get(key)
        if entry is None:
            _MISS.inc()
            return None
        self._entries.move_to_end(key)
        _HIT.inc()
        return entry.value

    def ticket(self) -> int:
        """Take before reading PostgreSQL for an answer to `put()` later."""
        return self._sequence

    def put(self, key: Hashable, shipment: str, value: bytes, ticket: int) -> bool:
        """Store `value`, the answer for `key` about `shipment`, read after `ticket` was
        taken; False (nothing stored) when the cache is not serving, the shipment
        changed since the ticket, or the answer alone exceeds the bound."""
        if not self.serving or self._changed_at.get(shipment, self._floor) > ticket:
            return False
        size = len(value) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return False
        self._remove(key)
        self._entries[key] = _Entry(value, shipment, size)
        self._by_shipment.setdefault(shipment, []).append(key)
        self._bytes += size
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
        metrics.QUERY_CACHE_BYTES.set(self._bytes)
        return True

    # --- the change feed's side ---------------------------------------------------------

    def changed(self, shipment: str) -> None:
        """A notification for `shipment` was taken: drop its answers, refuse the stores
        of reads in flight."""
        if self.max_bytes == 0:
            return  # off: nothing stored, nothing to refuse
        self._sequence += 1
        self._changed_at[shipment] = self._sequence
        self._changed_at.move_to_end(shipment)
        if len(self._changed_at) > self._recent_changes:
            _, forgotten = self._changed_at.popitem(last=False)
            self._floor = forgotten  # the oldest remembered: numbers only grow
        for key in self._by_shipment.pop(shipment, ()):
            entry = self._entries.pop(key)
            self._bytes -= entry.size
        metrics.QUERY_CACHE_BYTES.set(self._bytes)

    def everything_changed(self) -> None:
        """Any shipment may have changed (a rebuild switched the tables): drop every
        answer and refuse the stores of every read in flight."""
        self._entries.clear()
        self._by_shipment.clear()
        self._bytes = 0
        self._sequence += 1
        self._floor = self._sequence
        self._changed_at.clear()  # every stamp is at most the floor now
        metrics.QUERY_CACHE_BYTES.set(0)

    def lost(self) -> None:
        """The feed stopped listening (notifications may be missed): empty and off."""
        self._listening = False
        self.everything_changed()

    def listening(self) -> None:
        """LISTEN is established: serve again, but not what reads started before stored."""
        self.everything_changed()
        self._listening = True

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.size
        keys = self._by_shipment[entry.shipment]
        keys.remove(key)
        if not keys:
            del self._by_shipment[entry.shipment]
