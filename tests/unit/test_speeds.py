"""Per-piece pace tables against the per-key lookups they stand for (pure, no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np

from shared.domain.geo import Fix, LocalProjection
from shared.domain.speeds import HistoricalSpeeds, PiecePaces, SpeedParams, learn_speeds

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
