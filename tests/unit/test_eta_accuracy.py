"""ETA accuracy on real arrivals (shared.domain.eta_accuracy): pure, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.eta_accuracy import HORIZONS, GivenEta, score_arrival

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
ARRIVAL = T0 + timedelta(minutes=90)


def eta(minute: float, late_by_min: float) -> GivenEta:
    """An ETA given `minute` minutes after T0 that was `late_by_min` off the arrival."""
    at = T0 + timedelta(minutes=minute)
    return GivenEta(at, at, ARRIVAL + timedelta(minutes=late_by_min))


def by_horizon(given: list[GivenEta], **kwargs: float) -> dict[str, float]:
    return {s.horizon: s.error_s / 60 for s in score_arrival(given, ARRIVAL, **kwargs)}


def test_every_horizon_takes_the_eta_shown_at_its_instant() -> None:
    # One ETA a minute for the whole 90-minute trip; the error says which one was picked:
    # the one given at minute m was off by m / 10 minutes.
    given = [eta(m, m / 10) for m in range(90)]
    errors = by_horizon(given)
    assert list(errors) == list(HORIZONS)
    # Lead times: 60 min before the arrival is minute 30, ..., 5 min before is minute 85.
    assert errors["60m"] == pytest.approx(3.0)
    assert errors["30m"] == pytest.approx(6.0)
    assert errors["15m"] == pytest.approx(7.5)
    assert errors["5m"] == pytest.approx(8.5)
    # Fractions of the trip from the first ETA (minute 0) to the arrival (minute 90).
    assert errors["25%"] == pytest.approx(2.2)  # minute 22.5 shows the ETA of minute 22
    assert errors["50%"] == pytest.approx(4.5)
    assert errors["75%"] == pytest.approx(6.7)  # minute 67.5 shows the ETA of minute 67


def test_a_trip_shorter_than_a_lead_time_has_no_score_there() -> None:
    given = [eta(m, -1) for m in range(50, 90)]  # the first ETA came 40 min before arrival
    errors = by_horizon(given)
    assert "60m" not in errors
    assert set(errors) == set(HORIZONS) - {"60m"}
    assert all(v == pytest.approx(-1) for v in errors.values())


def test_a_stale_eta_is_not_scored() -> None:
    # Tracking went silent from minute 15 to minute 80: the ETA of minute 15 was still
    # shown 60, 30 and 15 minutes before arrival, but says nothing about the model there.
    given = [eta(m, 2) for m in (*range(0, 16), *range(80, 90))]
    errors = by_horizon(given)
    assert set(errors) == {"5m", "25%"}  # minute 85; minute 22.5, 7.5 min after an ETA
    assert set(by_horizon(given, max_staleness_s=3600)) == set(HORIZONS)


def test_etas_given_after_the_arrival_do_not_count() -> None:
    before = [eta(m, 3) for m in range(0, 90, 5)]
    after = [eta(m, 100) for m in range(90, 120)]
    assert score_arrival(before + after, ARRIVAL) == score_arrival(before, ARRIVAL)
    assert score_arrival(after, ARRIVAL) == []
    assert score_arrival([], ARRIVAL) == []


def test_lead_and_sign() -> None:
    [score] = [s for s in score_arrival([eta(0, -4), eta(80, 5)], ARRIVAL) if s.horizon == "5m"]
    assert score.error_s == 300.0  # too late by 5 minutes
    assert score.lead_s == 600.0  # given 10 minutes before the arrival
    assert score.computed_at == T0 + timedelta(minutes=80)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="timezone"):
        score_arrival([], datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="staleness"):
        score_arrival([], ARRIVAL, max_staleness_s=-1)


history = st.lists(
    st.tuples(st.integers(0, 120 * 60), st.integers(-3600, 3600)),
    max_size=40,
    unique_by=lambda t: t[0],
).map(
    lambda rows: [
        GivenEta(
            T0 + timedelta(seconds=s), T0 + timedelta(seconds=s), ARRIVAL + timedelta(seconds=e)
        )
        for s, e in rows
    ]
)


@given(history, st.randoms(use_true_random=False))
def test_the_order_of_the_history_does_not_matter(
    given_etas: list[GivenEta], shuffler: st.SearchStrategy[object]
) -> None:
    shuffled = list(given_etas)
    shuffler.shuffle(shuffled)  # type: ignore[attr-defined]
    assert score_arrival(shuffled, ARRIVAL) == score_arrival(given_etas, ARRIVAL)


@given(history)
def test_each_score_is_an_eta_given_before_its_horizon(given_etas: list[GivenEta]) -> None:
    scores = score_arrival(given_etas, ARRIVAL)
    horizons = [s.horizon for s in scores]
    assert horizons == [h for h in HORIZONS if h in horizons]  # report order, no repeats
    for s in scores:
        assert GivenEta(s.computed_at, s.computed_at, s.estimated_arrival) in given_etas
        assert s.computed_at < ARRIVAL
        assert s.error_s == (s.estimated_arrival - ARRIVAL).total_seconds()
        if s.horizon.endswith("m"):
            assert s.lead_s >= int(s.horizon[:-1]) * 60


def test_summarize() -> None:
    from shared.domain.eta_accuracy import summarize

    assert summarize([]) is None
    s = summarize([-60.0, 120.0, 30.0, -300.0, 0.0])
    assert s is not None
    assert s.count == 5
    assert s.mae_s == pytest.approx(102.0)
    assert s.p50_s == 60.0  # |errors| sorted: 0, 30, 60, 120, 300
    assert s.p90_s == pytest.approx(228.0)  # 120 + 0.6 * (300 - 120)
    assert s.bias_s == pytest.approx(-42.0)


def test_geofence_arrival_is_the_entry_of_a_confirmed_stay() -> None:
    from shared.domain.eta_accuracy import geofence_arrival
    from shared.domain.geo import Fix, LocalProjection

    proj = LocalProjection(53.4, -2.9)
    destination = proj.to_latlon(0, 0)

    def at(s: int, x: float) -> Fix:
        return Fix(T0 + timedelta(seconds=s), *proj.to_latlon(x, 0))

    approach = [at(0, 2000), at(30, 1000), at(60, 400)]
    stay = [at(90, 80), at(120, 20), at(150, 10), at(180, 10)]
    assert geofence_arrival(destination, approach + stay) == T0 + timedelta(seconds=90)
    assert geofence_arrival(destination, approach) is None
    drive_by = [at(90, 80), at(100, -400), at(110, -900)]
    assert geofence_arrival(destination, approach + drive_by) is None


def test_eta_report_options_and_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.eta_report import main

    with pytest.raises(SystemExit) as stop:
        main(["--since", "2026-12-02", "--until", "2026-12-01"])
    assert stop.value.code == 2
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main([]) == 2
    assert "DATABASE_URL is not set" in capsys.readouterr().err


def test_eta_report_rows_and_trend() -> None:
    from shared.eta_report import build_report, format_report
    from shared.readmodel.eta_scores import StoredError

    until = T0 + timedelta(days=30)
    errors = [
        StoredError("acme", "5m", until - timedelta(days=1), 60.0),
        StoredError("acme", "5m", until - timedelta(days=2), -180.0),
        StoredError("acme", "5m", until - timedelta(days=10), 600.0),
        StoredError("beta", "50%", until - timedelta(days=3), 30.0),
    ]
    rows = build_report(errors, until - timedelta(days=7), until)
    assert [(r.tenant_id, r.horizon) for r in rows] == [("acme", "5m"), ("beta", "50%")]
    acme = rows[0]
    assert acme.summary is not None
    assert (acme.summary.count, acme.summary.mae_s, acme.summary.bias_s) == (2, 120.0, -60.0)
    assert (acme.mae_this_week_s, acme.mae_week_before_s) == (120.0, 600.0)
    text = format_report(rows, until - timedelta(days=7), until)
    assert text.splitlines()[2].endswith("better (-8.00)")
    assert text.splitlines()[3].endswith("-")  # beta has no week before
