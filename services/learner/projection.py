"""The learner's I/O shell: per poll batch, fold each tenant's points, store state and
new model versions in the runner's transaction (with the offsets: exactly once).

Run by shared.projection.ProjectionRunner under the name ``learner``: its own consumer
group on gps-points, offsets in projection_offsets beside the state in learner_state,
so a restart resumes from the last committed batch and a first start replays the topic
from the beginning. The fold (shared.domain.learner.fold) is pure; states are cached in
memory between batches and dropped whenever a transaction does not commit or
partitions change hands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from shared import metrics
from shared.config import LearnerSettings, TopicSettings
from shared.db import Connection
from shared.domain import learner
from shared.domain.geo import Fix
from shared.domain.learner import LearnerParams, LearnerState
from shared.domain.speeds import SpeedParams
from shared.domain.tracking import gps_positions
from shared.projection import Delivered
from shared.readmodel import learner_state, model_snapshots

log = logging.getLogger(__name__)


def learner_params(settings: LearnerSettings) -> LearnerParams:
    """The fold's parameters from the service settings."""
    return LearnerParams(
        speeds=SpeedParams(timezone=settings.timezone),
        half_life_s=settings.half_life_days * 86400.0,
        max_cells=settings.max_cells,
        snapshot_every_s=settings.snapshot_every_s,
        settle_s=settings.settle_s,
    )


class LearnerProjection:
    """Per-tenant speed learning from the gps-points topic."""

    name = "learner"

    def __init__(self, topics: TopicSettings, settings: LearnerSettings) -> None:
        self.topics = (topics.gps_points,)
        self.payloads = {topics.gps_points: ("gps_batch",)}
        self.settings = settings
        self.params = learner_params(settings)
        #: Committed states (as of the last committed transaction).
        self.states: dict[str, LearnerState] = {}
        self._staged: dict[str, LearnerState] = {}
        #: Versions stored by the last committed batch, per tenant.
        self.versions: dict[str, int] = {}
        self._staged_versions: dict[str, int] = {}

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        points: dict[str, list[tuple[str, Fix]]] = {}
        for record in records:
            envelope = record.envelope
            batch = envelope.gps_batch
            found = points.setdefault(envelope.tenant_id, [])
            found.extend((batch.vehicle_id, fix) for fix in gps_positions(batch))
        missing = [t for t in points if t not in self.states]
        loaded = await learner_state.load_states(connection, missing) if missing else {}
        staged: dict[str, LearnerState] = {}
        versions: dict[str, int] = {}
        for tenant in sorted(points):
            before = self.states.get(tenant) or loaded.get(tenant) or LearnerState()
            # The fold is CPU-bound: run it off the event loop so heartbeats go on.
            after, snapshot = await asyncio.to_thread(
                learner.fold, before, points[tenant], self.params
            )
            staged[tenant] = after
            late = after.late_points - before.late_points
            metrics.LEARNER_POINTS.labels("late").inc(late)
            metrics.LEARNER_POINTS.labels("learned").inc(len(points[tenant]) - late)
            if snapshot is not None:
                await model_snapshots.insert_snapshot(
                    connection, tenant, snapshot, self.settings.keep_versions
                )
                versions[tenant] = snapshot.version
        await learner_state.save_states(connection, staged)
        self._staged, self._staged_versions = staged, versions

    def committed(self) -> None:
        """The last batch's transaction committed: its states are now the stored ones."""
        self.states.update(self._staged)
        self.versions.update(self._staged_versions)
        for tenant, version in self._staged_versions.items():
            log.info("tenant %s: model version %d stored", tenant, version)
        if self.versions:
            metrics.LEARNER_MODEL_VERSION.labels("learner").set(max(self.versions.values()))
        self._staged, self._staged_versions = {}, {}

    def forget(self) -> None:
        """Not committed, or partitions changed hands: reload states from PostgreSQL."""
        self.states.clear()
        self._staged, self._staged_versions = {}, {}
