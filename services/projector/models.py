"""The projector's speed models: hot-loaded from eta_models, swapped whole between batches.

A poller (`ModelStore.run`) reads each tenant's newest version every
CARGOTRACK_MODEL_POLL_S, decodes it completely into a new `EtaModel`, and publishes a
new immutable `ModelSet` by replacing one reference. Live tracking takes the current
set once at the start of each batch (`LiveTracker.update`), so every estimate of a
batch comes from one model per tenant, and a model is never used half-loaded.

Before a tenant has any version, its model is the fleet average: the space-mean
speed of its vehicles' positions of the last `FALLBACK_WINDOW` (version 0); with no
history at all, the default speed (also version 0).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import asyncpg

from shared import metrics
from shared.domain.eta import EtaModel, EtaParams
from shared.domain.learner import decode_speeds
from shared.domain.speeds import HistoricalSpeeds, SpeedParams
from shared.readmodel import model_snapshots

log = logging.getLogger(__name__)

#: How far back the fallback's fleet average looks.
FALLBACK_WINDOW = timedelta(hours=1)
#: The fallback is recomputed at most this often (it scans recent positions).
FALLBACK_EVERY_S = 60.0


@dataclass(frozen=True)
class LoadedModel:
    """One tenant's model and the version it came from (0: not a learned version)."""

    version: int
    model: EtaModel


@dataclass(frozen=True)
class ModelSet:
    """Every tenant's model at one instant; immutable."""

    default: LoadedModel
    tenants: Mapping[str, LoadedModel] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, tenant_id: str) -> LoadedModel:
        """The tenant's model (the default one when it has none)."""
        return self.tenants.get(tenant_id, self.default)


def fleet_average_model(speed_mps: float, params: EtaParams | None = None) -> EtaModel:
    """A model that knows only the fleet's average speed (no cells, no hours)."""
    sp = SpeedParams()
    v = min(max(speed_mps, sp.min_speed_mps), sp.max_speed_mps)
    return EtaModel(HistoricalSpeeds(sp, 1.0 / v, {}, {}, {}, {}, 1.0, 1.0 / v), params)


class ModelStore:
    """Holds the current `ModelSet`; `run()` keeps it up to date until cancelled."""

    def __init__(
        self, pool: asyncpg.Pool | None, poll_s: float, params: EtaParams | None = None
    ) -> None:
        self.pool = pool
        self.poll_s = poll_s
        self.params = params or EtaParams()
        self.current = ModelSet(LoadedModel(0, EtaModel(None, self.params)))
        self._fallback_at = -1e18
        self._fallback: dict[str, LoadedModel] = {}
        self.loaded_event = asyncio.Event()
        self._refreshing = asyncio.Lock()
        # Two refreshes at once could publish an older version after a newer one.
        self._refreshing = asyncio.Lock()

    async def run(self) -> None:
        """Poll until cancelled. Raises on a database failure (the supervisor stops)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> ModelSet:
        """Load what changed and publish a new set (the old one stays valid for whoever
        holds it). Returns the set now current. Refreshes run one at a time: two at
        once could publish an older version after a newer one."""
        async with self._refreshing:
            return await self._refresh()

    async def _refresh(self) -> ModelSet:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        async with self.pool.acquire() as connection:
            newest = await model_snapshots.latest_versions(connection)
            tenants = dict(self.current.tenants)
            for tenant, version in newest.items():
                held = tenants.get(tenant)
                if held is not None and held.version == version:
                    continue
                stored = await model_snapshots.load_model(connection, tenant, version)
                if stored is None:
                    continue  # deleted meanwhile: the next poll finds the newer one
                speeds = await asyncio.to_thread(decode_speeds, stored.payload)
                model = EtaModel(speeds, self.params, version=version)
                tenants[tenant] = LoadedModel(version, model)
                log.info("tenant %s: model version %d loaded", tenant, version)
            if loop.time() - self._fallback_at >= FALLBACK_EVERY_S:
                self._fallback_at = loop.time()
                since = datetime.now(UTC) - FALLBACK_WINDOW
                averages = await model_snapshots.fleet_average_mps(connection, since)
                self._fallback = {
                    t: LoadedModel(0, fleet_average_model(v, self.params))
                    for t, v in averages.items()
                }
        for tenant, fallback in self._fallback.items():
            if tenant not in tenants or tenants[tenant].version == 0:
                tenants[tenant] = fallback
        self.current = ModelSet(self.current.default, MappingProxyType(tenants))
        if tenants:
            newest_loaded = max(m.version for m in tenants.values())
            metrics.LEARNER_MODEL_VERSION.labels("projector").set(newest_loaded)
        self.loaded_event.set()
        return self.current
