"""Per-piece pace tables against the per-key lookups they stand for (pure, no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np

from shared.domain.geo import Fix, LocalProjection
from shared.domain.speeds import (
    HistoricalSpeeds,
    PiecePaces,
    SpeedParams,
    _cell,
    learn_speeds,
)

PROJ = LocalProjection(40.4, -3.7)
T0 = datetime(2026, 2, 2, 0, 0, tzinfo=UTC)


def _traces(rng: random.Random) -> list[list[Fix]]:
    traces = []
    for k in range(12):
        start = T0 + timedelta(hours=rng.uniform(0, 168))
        x, y = rng.uniform(-2000, 2000), rng.uniform(-2000, 2000)
        fixes = []
        for i in range(60):
            x += rng.uniform(-20, 200)
            y += rng.uniform(-20, 200) if k % 2 else rng.uniform(-200, 20)
            fixes.append(Fix(start + timedelta(seconds=15 * i), *PROJ.to_latlon(x, y)))
        traces.append(fixes)
    return traces


def test_piece_paces_equal_pace_for_every_piece_and_hour() -> None:
    rng = random.Random(2)
    speeds = learn_speeds(_traces(rng), SpeedParams(cell_m=200.0, timezone="Europe/Madrid"))
    assert not speeds.uniform
    n = 400
    xs, ys = np.array([rng.uniform(-2000, 9000) for _ in range(n)]), np.zeros(n)
    ys += np.array([rng.uniform(-2000, 9000) for _ in range(n)])
    lats, lons = PROJ.to_latlon_many(xs, ys)
    headings = np.array([rng.uniform(0, 360) for _ in range(n)])
    table = speeds.piece_paces(lats, lons, headings)
    keys = speeds.piece_keys(lats, lons, headings)
    for how in range(168):
        got = table.at_hour(how).tolist()
        assert got == [speeds.pace(cell, sector, how) for cell, sector in keys]
    assert len(table._hours) == PiecePaces.HOURS_KEPT  # bounded


def test_without_cells_every_piece_has_the_hour_pace() -> None:
    speeds = HistoricalSpeeds.empty()
    assert speeds.uniform
    assert all(speeds.hour_pace(h) == speeds.pace((5, 7), 3, h) for h in range(168))
    hourly = HistoricalSpeeds(SpeedParams(), 0.1, {3: 1.7, 4: 40.0}, {}, {}, {})
    assert hourly.uniform
    assert [hourly.hour_pace(h) for h in (2, 3, 4)] == [
        hourly.pace((0, 0), 0, h) for h in (2, 3, 4)
    ]


def _drive(y: float, speed: float, start: datetime) -> list[Fix]:
    """East along the line y, 10 s apart, at ``speed``."""
    return [
        Fix(start + timedelta(seconds=10 * i), *PROJ.to_latlon(10 * speed * i, y))
        for i in range(40)
    ]


def test_an_unseen_cell_takes_its_areas_pace_not_the_fleets() -> None:
    # A slow street (3 m/s) and, far away, a fast road (20 m/s): the fleet average is
    # in between. A cell next to the slow street, never driven, is in its area.
    params = SpeedParams(cell_m=300.0)
    speeds = learn_speeds([_drive(0.0, 3.0, T0), _drive(20_000.0, 20.0, T0)], params)
    lat, lon = PROJ.to_latlon(200.0, 350.0)  # beside the slow street's first cell
    cell = _cell(lat, lon, params.cell_m)
    assert cell not in speeds.cell_pace
    unseen = speeds.pace(cell, 2, 100)  # an hour with nothing learned
    assert unseen > speeds.global_pace * 1.5  # much slower than the fleet average
    without = learn_speeds(
        [_drive(0.0, 3.0, T0), _drive(20_000.0, 20.0, T0)],
        SpeedParams(cell_m=300.0, area_cells=0),
    )
    assert without.pace(cell, 2, 100) == without.global_pace
    assert not without.area_pace


def test_a_model_published_before_the_area_level_still_loads() -> None:
    speeds = learn_speeds([_drive(0.0, 3.0, T0)], SpeedParams())
    data = speeds.to_dict()
    del data["area_pace"]
    del data["params"]["area_cells"]
    old = HistoricalSpeeds.from_dict(data)
    assert not old.area_pace
    assert old.pace((10**6, 10**6), 0, 100) == old.global_pace  # unseen: the fleet's pace
    assert HistoricalSpeeds.from_dict(speeds.to_dict()) == speeds
