"""The learner service against real Kafka and PostgreSQL: resume, rebuild, hot swap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.learner.app import LearnerServer
from services.learner.projection import learner_params
from services.projector.app import ProjectorServer
from services.projector.models import ModelStore
from services.projector.rebuild import rebuild
from shared import tracking_store as store
from shared.config import Settings
from shared.db import create_pool
from shared.domain import learner
from shared.domain.geo import Fix
from shared.domain.learner import LearnerState
from shared.pb import envelope_pb2
from shared.projection import ProjectionRunner, wait_caught_up
from shared.readmodel import learner_state, model_snapshots
from tests.projection_helpers import (
    T0,
    end_offsets,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)

pytestmark = pytest.mark.timeout(180)


def _log(minutes: int) -> list[envelope_pb2.Envelope]:
    """Two tenants, three vehicles each, one 10-point batch per vehicle per 5 minutes."""
    log = []
    for seq in range(1, minutes // 5 + 1):
        for tenant in ("acme", "globex"):
            for v in range(3):
                points = []
                for i in range(10):
                    s = (seq - 1) * 300 + i * 30
                    lat = 53.40 + 0.0002 * s * (1 + v) / 3
                    lon = -2.99 + 0.0001 * s * (1 if tenant == "acme" else -1)
                    points.append((T0 + timedelta(seconds=s), lat, lon))
                log.append(gps_envelope(tenant, f"v{v}", "phone", seq, points))
    return log


def _points(log: list[envelope_pb2.Envelope]) -> dict[str, list[tuple[str, Fix]]]:
    out: dict[str, list[tuple[str, Fix]]] = {}
    for env in log:
        for p in env.gps_batch.points:
            fix = Fix(p.recorded_at.ToDatetime().replace(tzinfo=T0.tzinfo), p.latitude, p.longitude)
            out.setdefault(env.tenant_id, []).append((env.gps_batch.vehicle_id, fix))
    return out


@contextlib.asynccontextmanager
async def running_learner(settings: Settings) -> AsyncIterator[ProjectionRunner]:
    """The learner as production wires it (LearnerServer), yielding its runner once it
    owns its partitions (so that what a test produces next is learned while it runs)."""
    async with LearnerServer(settings) as running:
        await asyncio.wait_for(running.runner.assigned.wait(), 60)
        yield running.runner


async def _caught_up(runner: ProjectionRunner, settings: Settings) -> None:
    offsets = await end_offsets(settings, runner.projection.topics)
    await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=90)


async def _stored(
    settings: Settings,
) -> tuple[dict[str, LearnerState], dict[str, tuple[int, bytes]]]:
    pool = await create_pool(settings.database)
    try:
        async with pool.acquire() as connection:
            states = await learner_state.load_states(connection, ["acme", "globex"])
            models = {}
            for tenant in ("acme", "globex"):
                stored = await model_snapshots.versions_of(connection, tenant)
                if stored:
                    models[tenant] = (stored[0].version, stored[0].payload)
        return states, models
    finally:
        await pool.close()


async def test_restart_resumes_and_a_rebuild_learns_the_same_model(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    extra = {"CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S": "300"}
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema, **extra)
    await prepare(settings)
    log = _log(60)
    half = len(log) // 2
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log[:half])
    async with running_learner(settings) as runner:
        await _caught_up(runner, settings)
    first, _ = await _stored(settings)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log[half:])
    async with running_learner(settings) as runner:
        await _caught_up(runner, settings)
        # Resumed from the stored offsets: nothing of the first half was read again.
        assert runner.stats.records == len(log) - half
    resumed, resumed_models = await _stored(settings)
    assert resumed["acme"].points_learned > first["acme"].points_learned

    # A rebuild: a fresh schema, the same log, everything in one go.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    try:
        fresh = replace(settings, database=replace(settings.database, schema=schema))
        await prepare(fresh)
        async with running_learner(fresh) as runner:
            await _caught_up(runner, fresh)
        rebuilt, rebuilt_models = await _stored(fresh)
    finally:
        conn = await asyncpg.connect(database_url)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
    assert rebuilt_models == resumed_models
    for tenant in ("acme", "globex"):
        assert learner.state_to_dict(rebuilt[tenant]) == learner.state_to_dict(resumed[tenant])
    # And both are the pure fold of the log.
    params = learner_params(settings.learner)
    for tenant, points in _points(log).items():
        expected, _ = learner.fold(LearnerState(), points, params)
        assert learner.state_to_dict(resumed[tenant]) == learner.state_to_dict(expected)
        assert resumed[tenant].version > 0


async def test_projector_models_swap_whole_versions_between_batches(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """While the learner publishes versions, the projector's store, polling as in
    production, keeps swapping; every set it hands out holds, per tenant, one complete
    model of one stored version.

    The log goes in chunks; after each chunk the test waits for the learner to commit
    it (a version is stored in the same transaction as the offsets) and for the polling
    store to hand out that version. Waiting on those two events, not on how fast the
    learner happens to run, is what makes a swap certain after every chunk even on a
    loaded machine, while a sampler reads the store as fast as it can meanwhile."""
    extra = {"CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S": "60", "CARGOTRACK_LEARNER_KEEP_VERSIONS": "3"}
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema, **extra)
    await prepare(settings)
    log = _log(120)
    pool = await create_pool(settings.database)
    async with pool.acquire() as connection:
        # Every payload ever stored, kept even after the learner deletes old versions,
        # to check each model the store handed out against the version it claimed.
        await connection.execute(
            "CREATE TABLE archived_models AS SELECT tenant_id, version, payload"
            " FROM eta_models WITH NO DATA;"
            " CREATE FUNCTION archive_model() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO archived_models VALUES (NEW.tenant_id, NEW.version,"
            " NEW.payload); RETURN NEW; END $$;"
            " CREATE TRIGGER archive_model AFTER INSERT ON eta_models"
            " FOR EACH ROW EXECUTE FUNCTION archive_model();"
        )
    store = ModelStore(pool, 0.01)
    seen: dict[int, object] = {}
    mixed: list[tuple[int, int]] = []

    async def sample() -> None:
        while True:
            loaded = store.current.of("acme")
            seen.setdefault(loaded.version, loaded.model)
            if loaded.model.version != loaded.version:
                mixed.append((loaded.version, loaded.model.version))
            await asyncio.sleep(0.002)

    async def handed_out(version: int) -> None:
        while store.current.of("acme").version < version:
            store.loaded_event.clear()  # set again by the poller's next refresh
            await store.loaded_event.wait()

    swapped_to: list[int] = []
    poller = asyncio.create_task(store.run())
    sampler = asyncio.create_task(sample())
    try:
        async with running_learner(settings) as runner, producer_for(settings) as producer:
            for k in range(0, len(log), 24):  # 20 minutes of event time a chunk
                await send_all(producer, settings, log[k : k + 24])
                await _caught_up(runner, settings)
                async with pool.acquire() as connection:
                    newest = (await model_snapshots.versions_of(connection, "acme"))[0]
                await asyncio.wait_for(handed_out(newest.version), timeout=60)
                swapped_to.append(store.current.of("acme").version)
        final = store.current
        async with pool.acquire() as connection:
            stored = await model_snapshots.versions_of(connection, "acme")
            archived = {
                row["version"]: row["payload"]
                for row in await connection.fetch(
                    "SELECT version, payload FROM archived_models WHERE tenant_id = 'acme'"
                )
            }
    finally:
        for task in (sampler, poller):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pool.close()
    assert len(stored) <= 3
    newest_loaded = final.of("acme")
    assert newest_loaded.version == stored[0].version
    # Each chunk brought a newer version, handed out without a restart.
    assert len(swapped_to) == math.ceil(len(log) / 24)
    assert swapped_to == sorted(set(swapped_to))
    assert swapped_to[0] > 0
    assert not mixed
    # Every model handed out is exactly the payload of the version it claimed: never a
    # mix of two versions, never half a model.
    assert set(swapped_to) <= set(seen)
    for version, model in seen.items():
        assert version == 0 or version % 60 == 0
        if version > 0:
            assert model.speeds == learner.decode_speeds(archived[version])  # type: ignore[attr-defined]


async def test_before_any_version_the_projector_uses_the_fleet_average(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    pool = await create_pool(settings.database)
    try:
        now = datetime.now(UTC)
        async with pool.acquire() as connection:
            # One vehicle, 500 m north every 50 s (10 m/s); one 20-minute gap (ignored).
            await connection.executemany(
                "INSERT INTO vehicle_positions (tenant_id, vehicle_id, recorded_at, latitude,"
                " longitude, event_id) VALUES ('acme', 'v1', $1, $2, -2.99, 'e')",
                [
                    (
                        now - timedelta(seconds=50 * (10 - k) + (1200 if k < 3 else 0)),
                        53.40 + 0.0044966 * k,
                    )
                    for k in range(10)
                ],
            )
        store = ModelStore(pool, 60.0)
        models = await store.refresh()
    finally:
        await pool.close()
    acme = models.of("acme")
    assert acme.version == 0
    assert acme.model.speeds.global_speed_mps == pytest.approx(10.0, rel=0.01)
    assert models.of("nobody").model.speeds.global_speed_mps == 8.0  # the default


async def test_every_stored_eta_records_the_model_version_it_came_from(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    # A stored version for acme: the model the learner would have published.
    params = learner_params(settings.learner)
    state, _ = learner.fold(LearnerState(), _points(_log(30))["acme"], params)
    snapshot = learner.ModelSnapshot(1796256000, state.learned_from, 1796256000.0, 9,
                                     learner.build(state, params))  # fmt: skip
    pool = await create_pool(settings.database)
    try:
        async with pool.acquire() as connection:
            await model_snapshots.insert_snapshot(connection, "acme", snapshot, keep=3)
        log = lifecycle("acme", "s1", "v1", T0) + lifecycle("globex", "s1", "v1", T0)
        for tenant in ("acme", "globex"):
            points = [(T0 + timedelta(seconds=30 * i), 53.40 + 0.001 * i, -2.99) for i in range(8)]
            log.append(gps_envelope(tenant, "v1", "phone", 1, points))
        async with producer_for(settings) as producer:
            await send_all(producer, settings, log)
        # The projector as production wires it: its models loaded at start.
        group_id = f"{settings.topics.prefix}projector"
        async with ProjectorServer(settings, group_id=group_id) as projector:
            projection = projector.runner.projection
            offsets = await end_offsets(settings, projection.topics)
            await wait_caught_up(pool, projection.name, offsets, timeout_s=90)
        async with pool.acquire() as connection:
            history = await connection.fetch(
                "SELECT tenant_id, model_version FROM eta_history ORDER BY tenant_id"
            )
            tracked = {
                row["tenant_id"]: json.loads(row["eta"])
                for row in await connection.fetch("SELECT tenant_id, eta FROM shipment_tracking")
            }
    finally:
        await pool.close()
    assert {r["tenant_id"] for r in history} == {"acme", "globex"}
    for row in history:
        assert row["model_version"] == (1796256000 if row["tenant_id"] == "acme" else 0)
    assert tracked["acme"]["model_version"] == 1796256000
    assert tracked["globex"]["model_version"] == 0
    # What the portal gets: the Eta message cites the version.
    assert store.eta_message(tracked["acme"]).model_version == 1796256000


async def test_a_tracking_rebuild_keeps_the_learner_state_versions_and_offsets(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    extra = {"CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S": "300"}
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema, **extra)
    await prepare(settings)
    log = _log(40)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log[:-6])
    async with running_learner(settings) as runner:
        await _caught_up(runner, settings)
    before, before_models = await _stored(settings)
    await rebuild(settings, switch_lag=0, progress=lambda _line: None)
    after, after_models = await _stored(settings)
    assert after_models == before_models
    assert {t: learner.state_to_dict(s) for t, s in after.items()} == {
        t: learner.state_to_dict(s) for t, s in before.items()
    }
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log[-6:])
    async with running_learner(settings) as runner:
        await _caught_up(runner, settings)
        assert runner.stats.records == 6  # resumed from the carried-over offsets
