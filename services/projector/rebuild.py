"""`cargotrack rebuild`: replay the log into fresh tables, then switch atomically.

1. Migrate a fresh schema `<schema>_rebuild_<stamp>` and run the tracking
   projection into it from the beginning of every topic (its offsets table starts
   empty, so the runner seeks to the beginning), printing progress.
2. When it is close to the live projection, lock the live offsets table (the
   live projector's next commit waits), let the rebuild pass the live offsets,
   stop it, and carry over which alerts were already published (the rebuild
   never re-announces the past).
3. In the same transaction rename the live schema away and the rebuilt one into
   its place. Queries keep answering throughout: before the commit they read the
   old tables, after it the new ones; the commit notifies tracking-query that every
   shipment may have changed (its watches re-read, its response cache empties). The
   old schema is dropped afterwards (unless --keep-old), which also makes every
   cached plan re-resolve its tables.
4. The live projector, on its next batch, finds the offsets moved (fencing) and
   re-seeks to the rebuilt schema's offsets: nothing lost, nothing applied twice.

A projection added later catches up the same way: it starts with no offsets and
replays from the beginning of the retained log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.projector.live import LiveTracker
from services.projector.models import ModelStore
from services.projector.projection import TrackingProjection
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import make_producer
from shared.projection import ProjectionRunner, load_offsets
from shared.readmodel import (
    alert_outbox,
    learner_state,
    model_snapshots,
    vehicle_positions,
    webhooks,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RebuildReport:
    schema: str
    records: int
    seconds: float
    dropped_old: str | None

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


async def _end_offsets(consumer: AIOKafkaConsumer, topics: list[str]) -> dict[TopicPartition, int]:
    partitions = [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or [])
    ]
    offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    return offsets


def _lag(stored: dict[TopicPartition, int], targets: dict[TopicPartition, int]) -> int:
    """Records between the stored offsets and the targets (next offsets)."""
    return sum(max(0, end - 1 - stored.get(tp, -1)) for tp, end in targets.items())


async def rebuild(
    settings: Settings,
    *,
    keep_old: bool = False,
    switch_lag: int = 1000,
    progress: Callable[[str], None] = print,
) -> RebuildReport:
    """Rebuild the tracking projection from the log and switch to it (see module doc)."""
    live_schema = settings.database.schema
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    new_schema = f"{live_schema}_rebuild_{stamp}"
    new_db = dataclasses.replace(settings.database, schema=new_schema)
    await migrate(new_db)
    # ETAs are recomputed with the live schema's current models (the learner's
    # tables are carried over at the switch, not rebuilt): loaded once, kept.
    live_pool = await create_pool(settings.database, min_size=0, max_size=1)
    try:
        models = ModelStore(live_pool, settings.learner.model_poll_s)
        await models.refresh()
    finally:
        await live_pool.close()
    projection = TrackingProjection(settings.topics, LiveTracker(settings.alerts, models=models))
    topics = list(projection.topics)
    started = time.monotonic()
    pool = await create_pool(new_db)
    async with pool.acquire() as connection:
        # The history's day partitions before the replay, as the live projector keeps
        # them: a point replayed into the DEFAULT partition would make creating its
        # day's partition fail later, and the projector would crash-loop.
        await vehicle_positions.maintain_position_partitions(
            connection, datetime.now(UTC), settings.position_retention_days
        )
    producer = make_producer(settings.kafka)
    await producer.start()
    runner = ProjectionRunner(
        projection,
        pool,
        settings.kafka,
        settings.topics.dead_letters,
        producer,
        group_id=f"cargotrack-{projection.name}-rebuild-{stamp}",
    )
    task = asyncio.create_task(runner.run(), name="rebuild")
    live = await asyncpg.connect(settings.database.url)
    # One metadata client for the whole rebuild (it only reads end offsets).
    offsets_reader = AIOKafkaConsumer(**settings.kafka.client_options())
    await offsets_reader.start()
    try:
        # Phase 1: catch up with the log's end as it moves, reporting progress.
        while True:
            await _check(task)
            targets = await _end_offsets(offsets_reader, topics)
            async with pool.acquire() as connection:
                stored = await load_offsets(connection, projection.name, list(targets))
            lag = _lag(stored, targets)
            progress(
                f"rebuild: {runner.stats.records} records applied,"
                f" {runner.stats.records / max(time.monotonic() - started, 1e-9):,.0f}/s,"
                f" {lag} behind"
            )
            if lag <= switch_lag:
                break
            await asyncio.sleep(1.0)
        # Phase 2: freeze the live projection's commits and pass its offsets.
        async with live.transaction():
            await live.execute(f'LOCK TABLE "{live_schema}".projection_offsets IN EXCLUSIVE MODE')
            live_offsets = {
                TopicPartition(r["topic"], r["partition"]): r["last_offset"]
                for r in await live.fetch(
                    f'SELECT topic, partition, last_offset FROM "{live_schema}".projection_offsets'
                    " WHERE projection = $1",
                    projection.name,
                )
            }
            targets = {tp: offset + 1 for tp, offset in live_offsets.items()}
            while True:
                await _check(task)
                async with pool.acquire() as connection:
                    stored = await load_offsets(connection, projection.name, list(targets))
                if _lag(stored, targets) == 0:
                    break
                await asyncio.sleep(0.05)
            async with runner.batch_lock:  # no rebuild batch in flight from here on
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # Carry over publication: the rebuild never re-announces the past.
            await alert_outbox.carry_publication(live, live_schema, new_schema)
            # Other consumers' state (the speed learner: its state, model versions and
            # offsets; webhooks: endpoints, deliveries, offsets) is not rebuilt: carry
            # it over as it stands. Their commits wait on the lock above; one that
            # lands in the old schema meanwhile is fenced on its next batch and
            # replayed from these offsets.
            await learner_state.copy_to_schema(live, live_schema, new_schema)
            await model_snapshots.copy_to_schema(live, live_schema, new_schema)
            await webhooks.copy_to_schema(live, live_schema, new_schema)
            await live.execute(
                f'INSERT INTO "{new_schema}".projection_offsets SELECT * FROM'
                f' "{live_schema}".projection_offsets WHERE projection <> $1'
                " ON CONFLICT DO NOTHING",
                projection.name,
            )
            old_schema = f"{live_schema}_old_{stamp}"
            await live.execute(f'ALTER SCHEMA "{live_schema}" RENAME TO "{old_schema}"')
            await live.execute(f'ALTER SCHEMA "{new_schema}" RENAME TO "{live_schema}"')
            # The rebuilt rows were written under another schema's name, so their
            # triggers notified another channel: tell tracking-query, on commit, that
            # any shipment may have changed (payload "*": its watches re-read and its
            # response cache empties; services/tracking_query/watch.py).
            await live.execute("SELECT pg_notify($1, '*')", f"{live_schema}.shipment_changed")
        dropped = None
        if not keep_old:
            await live.execute(f'DROP SCHEMA "{old_schema}" CASCADE')
            dropped = old_schema
        seconds = time.monotonic() - started
        progress(f"rebuild: switched to the rebuilt state ({runner.stats.records} records)")
        return RebuildReport(live_schema, runner.stats.records, seconds, dropped)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await offsets_reader.stop()
        await live.close()
        await producer.stop()
        await pool.close()


async def _check(task: asyncio.Task[None]) -> None:
    """Re-raise the runner's failure instead of waiting forever for progress."""
    if task.done():
        task.result()
        raise RuntimeError("the rebuild runner stopped unexpectedly")
