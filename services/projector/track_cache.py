"""The projector's in-memory recent tracks of the vehicles it tracks (no I/O).

Each vehicle's recent track is kept between batches, so a batch reads from
PostgreSQL only the tracks it has not seen: the cache holds exactly what
`vehicle_positions` holds for the vehicle after a known instant, as of the last
committed transaction. services/projector/live.py stages a batch's changes and
applies them only when the runner reports the commit; any failure or change of
partition ownership empties it, because another projector may have written the
vehicle's history meanwhile.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

from shared import metrics
from shared.domain.geo import Fix, TrackMemo
from shared.readmodel.rows import VehicleKey


@dataclass
class VehicleTrack:
    """A vehicle's fixes (time order) and its GPS records' instants, for one batch."""

    fixes: list[Fix]
    times: list[datetime]
    #: Event time of each GPS record: its newest fix. Sorted, distinct.
    records: list[datetime]
    #: What the ETA model worked out about these fix objects (the cached track's memo).
    memo: TrackMemo = field(default_factory=TrackMemo)

    def up_to(self, moment: datetime, window_s: float) -> list[Fix]:
        """The fixes in (moment - window_s, moment]."""
        lo = bisect.bisect_right(self.times, moment - timedelta(seconds=window_s))
        hi = bisect.bisect_right(self.times, moment)
        return self.fixes[lo:hi]

    def at(self, moment: datetime) -> tuple[float, float] | None:
        """Where the newest fix at or before `moment` was."""
        i = bisect.bisect_right(self.times, moment)
        return (self.fixes[i - 1].lat, self.fixes[i - 1].lon) if i else None


def _fix_order(fix: Fix) -> tuple[datetime, float, float]:
    # The order the history query returns rows in (recorded_at, latitude, longitude).
    return fix.at, fix.lat, fix.lon


@dataclass(frozen=True)
class CachedTrack:
    """A vehicle's history rows after `covered_from` (exclusive), in history order.

    Immutable: a batch derives new tracks from the committed ones, so a rollback
    leaves the cache as it was. The derived tracks share one `memo`: it only records
    what the ETA model worked out about fix objects (pure functions of them), which
    stays true whatever commits; `TrackCache.apply` trims it to the committed fixes.
    """

    covered_from: datetime
    fixes: tuple[Fix, ...]
    #: The GPS record (event id) of each fix.
    events: tuple[str, ...]
    memo: TrackMemo = field(default_factory=TrackMemo, compare=False, repr=False)

    def covers(self, since: datetime) -> bool:
        return self.covered_from <= since

    def with_points(self, points: Sequence[tuple[str, Fix]]) -> CachedTrack:
        """This track plus a batch's new history rows: the fixes the fold decoded, kept
        as they are (a fix equals what reading its row back gives: see
        `vehicle_positions.recent_fixes`)."""
        added = [(fix, event_id) for event_id, fix in points]
        merged = list(zip(self.fixes, self.events, strict=True))
        in_order = not merged or _fix_order(merged[-1][0]) <= _fix_order(added[0][0])
        merged.extend(added)
        if not in_order or any(_fix_order(a[0]) > _fix_order(b[0]) for a, b in pairwise(added)):
            merged.sort(key=lambda pair: _fix_order(pair[0]))
        return CachedTrack(
            self.covered_from,
            tuple(f for f, _ in merged),
            tuple(e for _, e in merged),
            self.memo,
        )

    def after(self, moment: datetime) -> CachedTrack:
        """The same track without the rows at or before `moment` (never widens it)."""
        if moment <= self.covered_from:
            return self
        lo = bisect.bisect_right(self.fixes, moment, key=lambda f: f.at)
        return CachedTrack(moment, self.fixes[lo:], self.events[lo:], self.memo)

    def view(self, after: datetime) -> VehicleTrack:
        """What the history query returns for rows after `after` (must be covered)."""
        lo = bisect.bisect_right(self.fixes, after, key=lambda f: f.at)
        fixes = list(self.fixes[lo:])
        newest: dict[str, datetime] = {}
        for fix, event_id in zip(fixes, self.events[lo:], strict=True):
            newest[event_id] = fix.at  # time order: the last one of a record is its newest
        return VehicleTrack(fixes, [f.at for f in fixes], sorted(set(newest.values())), self.memo)


class TrackCache:
    """Recent tracks of the vehicles this projector tracks, bounded by fixes held.

    Live tracking visits the moving vehicles over and over in much the same
    order, and plain LRU eviction fails on such a cycle once the budget is below
    the working set (every vehicle is evicted just before it is needed again).
    So a vehicle already held always keeps its place; a new one is admitted into
    free room, or into room made by evicting vehicles idle for `idle_s`, and is
    otherwise read from PostgreSQL each time: the hit rate then degrades to
    budget / working set instead of to zero. The budget is a hard bound: growth
    of held tracks evicts the least recently used.
    """

    def __init__(
        self,
        max_fixes: int,
        *,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_fixes = max_fixes
        self.idle_s = idle_s
        self._clock = clock
        #: Least recently used first; with the time of each vehicle's last use.
        self._tracks: OrderedDict[VehicleKey, tuple[CachedTrack, float]] = OrderedDict()
        self._fixes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def fixes(self) -> int:
        return self._fixes

    def get(self, key: VehicleKey) -> CachedTrack | None:
        held = self._tracks.get(key)
        return held[0] if held is not None else None

    def lookup(
        self, key: VehicleKey, since: datetime, staged: CachedTrack | None = None
    ) -> CachedTrack | None:
        """`staged` (this batch's version of the track), else the held track of `key`,
        if it covers `since`; counted as a hit or a miss."""
        track = staged if staged is not None else self.get(key)
        if track is not None and track.covers(since):
            self.hits += 1
            metrics.PROJECTOR_TRACK_CACHE.labels("memory").inc()
            return track
        self.misses += 1
        metrics.PROJECTOR_TRACK_CACHE.labels("database").inc()
        return None

    def apply(self, changes: Mapping[VehicleKey, CachedTrack | None]) -> None:
        """Store a committed batch's tracks (None: forget that vehicle). Each stored
        track's memo is trimmed to its fixes (oldest first, as `TrackMemo.retain` wants
        them: what slid out goes at once, the rest within the memo's spare), so memos
        are bounded with the tracks."""
        now = self._clock()
        newcomers = []
        for key, track in changes.items():
            if track is not None:
                track.memo.retain(track.fixes)
            if key not in self._tracks:
                if track is not None:
                    newcomers.append((key, track))
                continue
            old, _ = self._tracks.pop(key)
            self._fixes -= len(old.fixes)
            if track is not None:
                self._tracks[key] = (track, now)
                self._fixes += len(track.fixes)
        while self._fixes > self.max_fixes and self._tracks:
            self._evict_oldest()
        for key, track in newcomers:
            size = len(track.fixes)
            while self._fixes + size > self.max_fixes and self._tracks:
                _, (_, used) = next(iter(self._tracks.items()))
                if now - used < self.idle_s:
                    break
                self._evict_oldest()
            if self._fixes + size <= self.max_fixes:
                self._tracks[key] = (track, now)
                self._fixes += size
        metrics.PROJECTOR_TRACK_CACHE_FIXES.set(self._fixes)

    def _evict_oldest(self) -> None:
        _, (evicted, _) = self._tracks.popitem(last=False)
        self._fixes -= len(evicted.fixes)

    def clear(self) -> None:
        self._tracks.clear()
        self._fixes = 0
        metrics.PROJECTOR_TRACK_CACHE_FIXES.set(0)
