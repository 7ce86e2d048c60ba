"""A subscriber's AlertFilter, validated once and compiled into a fast predicate.

Empty fields match everything. A region is a polygon in (longitude, latitude)
degrees treated as planar, which is exact enough for a depot or city region that
does not cross the ±180° meridian; a point on its boundary counts as inside. An
alert without a last location never matches a region filter (nothing says where
it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import shapely
from shapely.geometry import Polygon
from shapely.validation import explain_validity

from shared.domain.validation import Violation
from shared.pb import alerts_pb2, dispatch_pb2

MAX_SHIPMENT_IDS = 1000
MAX_RING_POINTS = 10_000


@dataclass(frozen=True)
class AlertMatcher:
    """Which alerts one subscriber wants (the tenant is checked separately)."""

    min_severity: int = 0
    kinds: frozenset[int] = frozenset()
    shipment_ids: frozenset[str] = frozenset()
    region: Polygon | None = None

    def matches(self, alert: alerts_pb2.Alert) -> bool:
        if alert.severity < self.min_severity:
            return False
        if self.kinds and alert.kind not in self.kinds:
            return False
        if self.shipment_ids and alert.shipment_id not in self.shipment_ids:
            return False
        if self.region is not None:
            if not alert.HasField("last_location"):
                return False
            where = alert.last_location
            return bool(shapely.intersects_xy(self.region, where.longitude, where.latitude))
        return True


def _region(polygon: dispatch_pb2.AlertFilter, violations: list[Violation]) -> Polygon | None:
    if not polygon.HasField("region"):
        return None
    ring = [(p.longitude, p.latitude) for p in polygon.region.ring]
    field = "filter.region"
    if not ring:
        return None  # an empty polygon message is no filter, like every empty field
    if len(ring) > MAX_RING_POINTS:
        violations.append(Violation(field, f"at most {MAX_RING_POINTS} points"))
        return None
    for i, (lon, lat) in enumerate(ring):
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90):
            violations.append(Violation(field, f"ring[{i}]: latitude out of range"))
            return None
        if not -180 <= lon <= 180:
            violations.append(Violation(field, f"ring[{i}]: longitude out of range"))
            return None
    distinct = set(ring)
    if len(distinct) < 3:
        violations.append(Violation(field, "a polygon needs at least 3 distinct points"))
        return None
    region = Polygon(ring)
    if not region.is_valid or region.area == 0:
        violations.append(Violation(field, f"invalid polygon: {explain_validity(region)}"))
        return None
    shapely.prepare(region)
    return region


def compile_filter(request: dispatch_pb2.AlertFilter) -> tuple[AlertMatcher, list[Violation]]:
    """The matcher for a filter, and every violation in it (empty when valid)."""
    violations: list[Violation] = []
    severities = set(alerts_pb2.Severity.values())
    if request.min_severity not in severities:
        violations.append(Violation("filter.min_severity", "unknown severity"))
    kinds = set()
    known_kinds = set(alerts_pb2.AlertKind.values()) - {alerts_pb2.ALERT_KIND_UNSPECIFIED}
    for i, kind in enumerate(request.kinds):
        if kind not in known_kinds:
            violations.append(Violation(f"filter.kinds[{i}]", "unknown or unspecified kind"))
        kinds.add(int(kind))
    if len(request.shipment_ids) > MAX_SHIPMENT_IDS:
        violations.append(Violation("filter.shipment_ids", f"at most {MAX_SHIPMENT_IDS} ids"))
    for i, shipment_id in enumerate(request.shipment_ids):
        if not shipment_id:
            violations.append(Violation(f"filter.shipment_ids[{i}]", "empty id"))
    region = _region(request, violations)
    matcher = AlertMatcher(
        min_severity=int(request.min_severity),
        kinds=frozenset(kinds),
        shipment_ids=frozenset(request.shipment_ids),
        region=region,
    )
    return matcher, violations
