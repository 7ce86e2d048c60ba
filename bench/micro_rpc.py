"""Microbenchmark: the per-call work of the gRPC front ends, old (baseline) against new, paired.

``python -m bench.micro_rpc`` times, in one process:

(a) bearer-token verification as the auth interceptor does it on every call: the old
    code (PyJWT signature and claims on every call, ``_old_verify_token`` below)
    against ``VerifiedTokens.verify`` (verified once, then the expiry re-checked),
    for one client's repeated token and for 1,000 clients' tokens in turn; and the
    new uncached ``verify_token`` against the old one (no change expected);
(b) validating one 500-point GPS batch: the old ``validate_gps_batch``
    (``_old_validate_gps_batch`` below: field paths built and every check run for
    every point) against the new one (plain comparisons first), on an all-valid
    batch and on one with every 10th point invalid. The verdicts are compared on
    every run, so the run doubles as an equality check. Also validation plus finding
    the batch's newest valid point, as gps-ingest's servicer does per batch (old: a
    ``max`` over the valid points; new: ``verdict.newest``, found while validating);
(c) tracking-query turning a stored row into the Shipment message (GetShipment,
    ListShipments, WatchShipment): old = the whole state decoded (``_view(row)``, as
    before and still for GetTimeline and TrackByToken) against the message-only
    decoding (``_view(row, whole_state=False)``: no timeline, no applied event ids).

Old and new run alternately, ``--rounds`` times (the order flips every round), each
timing ``--number`` operations; the report gives the best and median µs per
operation of each and the ratio new/old of the best. No thresholds: this measures,
it does not judge.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from bench.workload import ROUTE_LENGTH_M, route_of
from services.tracking_query.queries import _view
from shared import statecodec
from shared.auth import AuthError, Principal, Role, VerifiedTokens, mint_token, verify_token
from shared.config import AuthSettings
from shared.domain import polyline, tracking
from shared.domain.validation import (
    DEFAULT_MAX_FUTURE_SKEW,
    MAX_POINTS_PER_BATCH,
    GpsBatchVerdict,
    Violation,
    _check_gps_point,
    _check_id,
    _clock,
    validate_gps_batch,
)
from shared.envelopes import timestamp, utc_now
from shared.pb import common_pb2, envelope_pb2, gps_pb2, shipment_pb2

SECRET = "micro-rpc-bench-signing-key-" + "0123456789abcdef" * 3
SETTINGS = AuthSettings(jwt_secret=SECRET)
BATCH_POINTS = 500


# --- BASELINE: the code before the change, frozen here for comparison -------------------


def _old_verify_token(token: str, settings: AuthSettings) -> Principal:
    """BASELINE: shared.auth.verify_token as it was before the verified-token cache
    (the interceptor called it on every call)."""
    try:
        claims = jwt.decode(
            token,
            settings.verification_key,
            algorithms=settings.algorithms,
            audience=settings.audience,
            issuer=settings.issuer,
            options={"require": ["exp", "sub", "iss", "aud"]},
        )
    except jwt.PyJWTError as error:
        raise AuthError(f"invalid token: {error}") from None
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise AuthError(f"invalid token: unknown role {claims.get('role')!r}") from None
    tenant = claims.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise AuthError("invalid token: no tenant claim")
    principal = Principal(
        subject=str(claims["sub"]),
        tenant_id=tenant,
        role=role,
        vehicle_id=claims.get("vehicle_id"),
        customer_id=claims.get("customer_id"),
    )
    if role is Role.DRIVER and not principal.vehicle_id:
        raise AuthError("invalid token: a driver token needs a vehicle_id claim")
    if role is Role.CUSTOMER and not principal.customer_id:
        raise AuthError("invalid token: a customer token needs a customer_id claim")
    return principal


def _old_validate_gps_batch(
    batch: gps_pb2.GpsBatch,
    now: datetime,
    *,
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW,
    root: str = "batch",
) -> GpsBatchVerdict:
    """BASELINE: shared.domain.validation.validate_gps_batch as it was before the
    quick test for valid points (every point got _check_gps_point, which is
    unchanged and still what the new code runs on a point that fails the test)."""
    clock = _clock(now, max_future_skew)
    batch_violations: list[Violation] = []
    _check_id(batch_violations, f"{root}.vehicle_id", batch.vehicle_id)
    _check_id(batch_violations, f"{root}.device_id", batch.device_id)
    if batch.sequence < 1:
        batch_violations.append(
            Violation(f"{root}.sequence", "must be at least 1 (a device numbers batches from 1)")
        )
    count = len(batch.points)
    if not 1 <= count <= MAX_POINTS_PER_BATCH:
        batch_violations.append(
            Violation(
                f"{root}.points", f"must hold 1 to {MAX_POINTS_PER_BATCH} points, not {count}"
            )
        )
    if count > MAX_POINTS_PER_BATCH:
        return GpsBatchVerdict(batch_violations, {}, [])
    point_violations: dict[int, list[Violation]] = {}
    valid_points: list[gps_pb2.GpsPoint] = []
    for index, point in enumerate(batch.points):
        found: list[Violation] = []
        _check_gps_point(found, f"{root}.points[{index}]", point, clock)
        if found:
            point_violations[index] = found
        else:
            valid_points.append(point)
    return GpsBatchVerdict(
        batch_violations, point_violations, [] if batch_violations else valid_points
    )


# --- END OF BASELINE ---------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    name: str
    old_us: list[float]
    new_us: list[float]

    def row(self) -> str:
        old, new = min(self.old_us), min(self.new_us)
        return (
            f"{self.name:<44} {old:>10.2f} {statistics.median(self.old_us):>10.2f}"
            f" {new:>10.2f} {statistics.median(self.new_us):>10.2f} {new / old:>8.3f}"
        )


HEADER = (
    f"{'µs per operation':<44} {'old best':>10} {'old med':>10}"
    f" {'new best':>10} {'new med':>10} {'new/old':>8}"
)


def _per_op_us(operation: Callable[[], object], number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        operation()
    return (time.perf_counter_ns() - start) / number / 1000.0


def paired(
    name: str,
    old: Callable[[], object],
    new: Callable[[], object],
    *,
    rounds: int,
    number: int,
) -> Result:
    """Time `old` and `new` alternately (order flipped each round), `number` calls per turn."""
    old(), new()  # warm up: imports, caches, first allocations
    old_us: list[float] = []
    new_us: list[float] = []
    for turn in range(rounds):
        if turn % 2 == 0:
            old_us.append(_per_op_us(old, number))
            new_us.append(_per_op_us(new, number))
        else:
            new_us.append(_per_op_us(new, number))
            old_us.append(_per_op_us(old, number))
    return Result(name, old_us, new_us)


def token_cases(rounds: int, number: int) -> list[Result]:
    one = mint_token(SECRET, role=Role.CUSTOMER, tenant_id="t-1", subject="c", customer_id="c-1")
    many = [
        mint_token(SECRET, role=Role.OPS, tenant_id="t-1", subject=f"client-{i}")
        for i in range(1000)
    ]
    tokens = VerifiedTokens(SETTINGS)
    assert tokens.verify(one) == _old_verify_token(one, SETTINGS) == verify_token(one, SETTINGS)
    for token in many:
        assert tokens.verify(token) == _old_verify_token(token, SETTINGS)

    def cycling(verify: Callable[[str], Principal]) -> Callable[[], object]:
        position = 0

        def call() -> object:
            nonlocal position
            position = (position + 1) % len(many)
            return verify(many[position])

        return call

    return [
        paired(
            "token: one client's token, cached",
            lambda: _old_verify_token(one, SETTINGS),
            lambda: tokens.verify(one),
            rounds=rounds,
            number=number,
        ),
        paired(
            "token: 1,000 clients in turn, cached",
            cycling(lambda token: _old_verify_token(token, SETTINGS)),
            cycling(tokens.verify),
            rounds=rounds,
            number=number,
        ),
        paired(
            "token: verify_token, uncached (no change)",
            lambda: _old_verify_token(one, SETTINGS),
            lambda: verify_token(one, SETTINGS),
            rounds=rounds,
            number=number,
        ),
    ]


def gps_batch(now: datetime, *, invalid_every: int = 0) -> gps_pb2.GpsBatch:
    """A batch of BATCH_POINTS fixes at 1 Hz ending 1 s before `now`, moving east;
    with `invalid_every`, every such point has a bad latitude (and so a violation)."""
    batch = gps_pb2.GpsBatch(vehicle_id="VAN-0007", device_id="dev-0007", sequence=42)
    for i in range(BATCH_POINTS):
        recorded = Timestamp()
        recorded.FromDatetime(now - timedelta(seconds=BATCH_POINTS - i))
        bad = invalid_every and i % invalid_every == 0
        batch.points.add(
            recorded_at=recorded,
            latitude=math.nan if bad else 52.52,
            longitude=13.405 + i * 1e-4,
            accuracy_m=6.0,
            speed_mps=11.0,
            heading_deg=90.0,
        )
    return batch


def _old_newest(verdict: GpsBatchVerdict) -> gps_pb2.GpsPoint:
    """BASELINE: how gps-ingest's servicer found the batch's newest valid point."""
    return max(verdict.valid_points, key=lambda p: (p.recorded_at.seconds, p.recorded_at.nanos))


def validation_cases(rounds: int, number: int) -> list[Result]:
    now = utc_now()
    results = []
    for label, batch in (
        ("all valid", gps_batch(now)),
        ("every 10th bad", gps_batch(now, invalid_every=10)),
    ):
        verdict = validate_gps_batch(batch, now)
        assert verdict == _old_validate_gps_batch(batch, now)
        assert verdict.newest is _old_newest(verdict)

        def old_validate(batch: gps_pb2.GpsBatch = batch) -> object:
            return _old_validate_gps_batch(batch, now)

        def new_validate(batch: gps_pb2.GpsBatch = batch) -> object:
            return validate_gps_batch(batch, now)

        def old_admit(batch: gps_pb2.GpsBatch = batch) -> object:
            return _old_newest(_old_validate_gps_batch(batch, now))

        def new_admit(batch: gps_pb2.GpsBatch = batch) -> object:
            return validate_gps_batch(batch, now).newest

        results.append(
            paired(
                f"gps: validate {BATCH_POINTS} points, {label}",
                old_validate,
                new_validate,
                rounds=rounds,
                number=number,
            )
        )
        results.append(
            paired(
                f"gps: validate + find newest, {label}",
                old_admit,
                new_admit,
                rounds=rounds,
                number=number,
            )
        )
    return results


def _stored_row(now: datetime) -> dict[str, Any]:
    """A shipment in transit as tracking-query reads its row: a 100 km planned route,
    a four-entry timeline, a position and an ETA."""

    def envelope(minute: int, **member: Any) -> envelope_pb2.Envelope:
        moment = timestamp(now + timedelta(minutes=minute))
        event = shipment_pb2.ShipmentEvent(
            event_id=f"e-{minute}", shipment_id="S-1", occurred_at=moment, **member
        )
        return envelope_pb2.Envelope(
            event_id=f"e-{minute}",
            tenant_id="t-1",
            occurred_at=moment,
            recorded_at=moment,
            shipment_event=event,
        )

    created = shipment_pb2.ShipmentCreated(
        customer_id="C-1",
        origin=common_pb2.LatLng(latitude=52.40, longitude=13.05),
        destination=common_pb2.LatLng(latitude=52.95, longitude=13.90),
        promised_window=common_pb2.TimeWindow(
            start=timestamp(now + timedelta(hours=5)), end=timestamp(now + timedelta(hours=6))
        ),
        planned_route=polyline.encode(route_of(1).vertices(ROUTE_LENGTH_M)),
        reference="PO 4711",
    )
    state = None
    for step in (
        envelope(0, created=created),
        envelope(1, vehicle_assigned=shipment_pb2.VehicleAssigned(vehicle_id="V-1")),
        envelope(2, picked_up=shipment_pb2.PickedUp()),
        envelope(3, in_transit=shipment_pb2.InTransit()),
    ):
        state = tracking.apply(state, step)
    assert state is not None
    position = {
        "lat": 52.6,
        "lon": 13.4,
        "recorded_at": now.isoformat(),
        "speed_mps": 11.0,
        "heading_deg": 45.0,
        "accuracy_m": 6.0,
    }
    eta = {
        "estimated_arrival": (now + timedelta(hours=2)).isoformat(),
        "computed_at": now.isoformat(),
        "confidence": 0.8,
        "method": 1,
        "remaining_m": 40_000.0,
    }
    return {
        "state": json.dumps(statecodec.encode(state)),
        "updated_at": state.updated_at,
        "position": json.dumps(position),
        "progress": None,
        "eta": json.dumps(eta),
    }


def query_cases(rounds: int, number: int) -> list[Result]:
    row: Any = _stored_row(utc_now())
    assert _view(row, whole_state=False).message() == _view(row).message()
    return [
        paired(
            "query: stored row -> Shipment message",
            lambda: _view(row).message(),
            lambda: _view(row, whole_state=False).message(),
            rounds=rounds,
            number=number,
        )
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_rpc", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="paired turns per case")
    parser.add_argument(
        "--number", type=int, default=2000, help="token verifications timed per turn"
    )
    parser.add_argument("--batches", type=int, default=40, help="batches validated per turn")
    args = parser.parse_args(argv)
    results = (
        token_cases(args.rounds, args.number)
        + validation_cases(args.rounds, args.batches)
        + query_cases(args.rounds, args.number)
    )
    print(HEADER)
    for result in results:
        print(result.row())
    print(f"best and median of {args.rounds} paired turns; old = baseline copied in this file")


if __name__ == "__main__":
    main()
