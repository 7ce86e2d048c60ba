"""tracking-query's views of stored rows: the lighter decoding for message-only reads."""

from __future__ import annotations

import json
from functools import reduce
from typing import Any

import pytest

from services.tracking_query.queries import _view
from shared import statecodec
from shared.domain.tracking import ShipmentState, apply
from shared.pb import envelope_pb2
from tests.unit.test_tracking_fold import (
    assigned,
    at,
    cancelled,
    confirmation,
    created,
    delivered,
    exception,
    failed,
    in_transit,
    out_for_delivery,
    picked_up,
)

HISTORIES: dict[str, list[envelope_pb2.Envelope]] = {
    "created": [created()],
    "in transit": [created(), assigned("e-a", 1), picked_up("e-p", 2), in_transit("e-t", 3)],
    "failed, then confirmed": [
        created(),
        assigned("e-a", 1),
        picked_up("e-p", 2),
        out_for_delivery("e-o", 3),
        failed("e-f", 4),
        out_for_delivery("e-o2", 5),
        confirmation("e-c", 6),
    ],
    "anomalies": [created(), delivered("e-d", 1), exception("e-x", 2), cancelled("e-k", 3)],
}

TRACKING: dict[str, dict[str, Any] | None] = {
    "no tracking row": None,
    "tracking": {
        "position": {
            "lat": 52.5,
            "lon": 13.4,
            "recorded_at": at(3).isoformat(),
            "speed_mps": 11.0,
            "heading_deg": 45.0,
            "accuracy_m": 6.0,
        },
        "progress": None,
        "eta": {
            "estimated_arrival": at(90).isoformat(),
            "earliest": at(80).isoformat(),
            "latest": at(100).isoformat(),
            "computed_at": at(3).isoformat(),
            "confidence": 0.8,
            "method": 1,
            "remaining_m": 12_000.0,
            "position_age_s": 4.5,
        },
    },
}


def row(state: ShipmentState, tracking: dict[str, Any] | None) -> Any:
    """A row as queries._SELECT returns it (jsonb columns come back as text), as a dict."""
    columns = tracking or {}
    return {
        "state": json.dumps(statecodec.encode(state)),
        "updated_at": state.updated_at,
        **{
            name: json.dumps(columns[name]) if columns.get(name) is not None else None
            for name in ("position", "progress", "eta")
        },
    }


@pytest.mark.parametrize("tracking", TRACKING.values(), ids=TRACKING.keys())
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_a_message_only_view_shows_exactly_the_whole_views_message(
    history: list[envelope_pb2.Envelope], tracking: dict[str, Any] | None
) -> None:
    state = reduce(apply, history, None)
    assert isinstance(state, ShipmentState)
    stored = row(state, tracking)
    whole = _view(stored)
    light = _view(stored, whole_state=False)
    assert whole.state == state
    assert whole.state.timeline  # what the light view leaves out is really there
    assert light.state.timeline == ()
    assert light.state.applied_event_ids == frozenset()
    assert light.message() == whole.message()
    assert light.message().SerializeToString(
        deterministic=True
    ) == whole.message().SerializeToString(deterministic=True)
    assert light.cursor == whole.cursor
    assert light.tracking == whole.tracking
