"""shared.statecodec: stored states read back, also those earlier versions stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from shared import statecodec
from shared.domain.geo import Fix
from shared.domain.tracking import VehicleState

T0 = datetime(2026, 3, 2, 8, 40, tzinfo=UTC)

#: A vehicle state as v0.1.0 stored it (its `Position` type: 0 = unknown speed,
#: heading and accuracy), with an unknown and a known reading.
STORED_BY_V0_1_0 = """{
  "device_sequences": [["dev-1", 3]],
  "evicted_devices": 0,
  "jump_candidate": {"accuracy_m": 0.0, "heading_deg": 0.0, "lat": 52.6, "lon": 13.5,
                     "recorded_at": "2026-03-02T08:44:00+00:00", "speed_mps": 0.0},
  "jump_streak": 1,
  "last_position": {"accuracy_m": 5.0, "heading_deg": 225.0, "lat": 52.485, "lon": 13.35,
                    "recorded_at": "2026-03-02T08:43:00+00:00", "speed_mps": 14.0},
  "tenant_id": "acme",
  "vehicle_id": "veh-1"
}"""


def test_a_state_stored_by_v0_1_0_decodes_with_zero_as_unknown() -> None:
    state = statecodec.decode_as(VehicleState, json.loads(STORED_BY_V0_1_0))
    assert state.last_position == Fix(T0 + timedelta(minutes=3), 52.485, 13.35, 14.0, 225.0, 5.0)
    assert state.jump_candidate == Fix(T0 + timedelta(minutes=4), 52.6, 13.5, None, None, None)
    assert state.last_position.t == (T0 + timedelta(minutes=3)).timestamp()
    assert state.device_sequences == (("dev-1", 3),)


def test_a_fix_is_stored_under_the_keys_earlier_versions_used() -> None:
    stored = statecodec.encode(Fix(T0, 52.5, 13.4, None, 90.0, None))
    # `recorded_at` is read by SQL (shipment_tracking.stale_candidates); `t` is derived.
    assert stored == {
        "recorded_at": T0.isoformat(),
        "lat": 52.5,
        "lon": 13.4,
        "speed_mps": None,
        "heading_deg": 90.0,
        "accuracy_m": None,
    }


readings = st.one_of(st.none(), st.floats(0.5, 400, width=32))


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.floats(-90, 90),
    st.floats(-180, 180),
    readings,
    readings,
    readings,
)
def test_a_vehicle_state_round_trips(
    at: datetime,
    lat: float,
    lon: float,
    speed: float | None,
    heading: float | None,
    accuracy: float | None,
) -> None:
    fix = Fix(at, lat, lon, speed, heading, accuracy)
    state = VehicleState("veh-1", "acme", last_position=fix, device_sequences=(("d", 1),))
    again = statecodec.decode_as(VehicleState, json.loads(json.dumps(statecodec.encode(state))))
    assert again == state
    assert again.last_position is not None
    assert again.last_position.t == fix.t
