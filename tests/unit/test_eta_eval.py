"""The ETA evaluation on the shipped CI slices of real trajectories."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devtools.eta_eval import (
    CHECKPOINTS,
    DATASETS,
    METHODS,
    DatasetReport,
    evaluate,
    main,
    trim_terminal_dwell,
)
from shared.domain.geo import Fix, LocalProjection


@pytest.fixture(scope="module")
def reports() -> list[DatasetReport]:
    return evaluate(use_slice=True)


def test_slice_evaluation_scores_every_method_with_finite_numbers(
    reports: list[DatasetReport],
) -> None:
    assert [r.name for r in reports] == list(DATASETS)
    for r in reports:
        assert r.trips_scored >= 1
        assert r.trips_learning >= 1
        for method in METHODS:
            maes = r.scores[method].mae()
            assert len(maes) == len(CHECKPOINTS)
            assert all(math.isfinite(v) and v >= 0 for v in maes), (r.name, method, maes)
            assert all(len(e) == r.trips_scored for e in r.scores[method].errors_min)


def test_main_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--slice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["dataset", "method", "n", "MAE@25%", "MAE@50%", "MAE@75%"]
    rows = lines[2 : 2 + len(DATASETS) * len(METHODS)]
    for row in rows:
        numbers = row.split()[-4:]
        assert int(numbers[0]) >= 1
        assert all(math.isfinite(float(v)) for v in numbers[1:])
    assert {r.split()[0] for r in rows} == set(DATASETS)


def test_main_json_and_dataset_filter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--slice", "--dataset", "austin", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["dataset"] for d in data] == ["austin"]
    assert set(data[0]["mae_min"]) == set(METHODS)


def test_main_reports_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--slice", "--data", str(tmp_path)]) == 2
    assert "no data file" in capsys.readouterr().err


def test_trim_terminal_dwell() -> None:
    proj = LocalProjection(53.4, -2.9)
    t0 = datetime(2026, 1, 26, tzinfo=UTC)

    def f(s: int, x: float) -> Fix:
        return Fix(t0 + timedelta(seconds=s), *proj.to_latlon(x, 0))

    wait = [f(0, 0), f(30, 5), f(60, 10)]
    move = [f(90, 500), f(120, 1000)]
    layover = [f(150, 1490), f(180, 1500), f(210, 1502)]
    trimmed = trim_terminal_dwell([*wait, *move, *layover])
    assert trimmed == [wait[-1], *move, layover[0]]


def test_porto_loader_times_each_fix_15_s_apart_from_the_trip_start(tmp_path: Path) -> None:
    csv_path = tmp_path / "porto.csv"
    csv_path.write_text(
        '"TRIP_ID","CALL_TYPE","ORIGIN_CALL","ORIGIN_STAND","TAXI_ID","TIMESTAMP",'
        '"DAY_TYPE","MISSING_DATA","POLYLINE"\n'
        '"1","C","","","7","1372636858","A","False",'
        '"[[-8.618643,41.141412],[-8.620326,41.14251],[-8.622153,41.143815]]"\n'
        '"2","C","","","8","1372636900","A","True","[[-8.6,41.1],[-8.61,41.11]]"\n'
    )
    trips = DATASETS["porto"].loader(csv_path)
    assert [t.trip_id for t in trips] == ["7/1"]  # MISSING_DATA rows are skipped
    fixes = trips[0].fixes
    assert [f.t - 1372636858 for f in fixes] == [0.0, 15.0, 30.0]
    assert (fixes[0].lat, fixes[0].lon) == (41.141412, -8.618643)  # [lon, lat] in the file


def test_porto_scores_taxi_trips_on_their_own_path(reports: list[DatasetReport]) -> None:
    porto = next(r for r in reports if r.name == "porto")
    assert DATASETS["porto"].planned_route == "own path"
    assert porto.trips_scored >= 10
    assert "no planned route from another trip" not in porto.skipped
    assert porto.model_route_share == 1.0
