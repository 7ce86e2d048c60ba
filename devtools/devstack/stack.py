"""Kafka + PostgreSQL together: what ``cargotrack dev`` and the integration tests run on.

Either server is replaced by an existing one when its environment variable is set:
``KAFKA_BOOTSTRAP_SERVERS`` (no broker started) and ``DATABASE_URL`` (no PostgreSQL
started). External servers are used as they are: never started, stopped or wiped.

``CARGOTRACK_KAFKA_BROKERS=3`` runs Kafka as a 3-node cluster (:class:`KafkaCluster`)
instead of one broker; the services then create their topics with replication factor
3 and ``min.insync.replicas=2`` (:meth:`LocalStack.topic_env`).

``CARGOTRACK_POSTGRES_STANDBY=1`` adds a streaming standby of the local PostgreSQL
(:class:`PostgresStandby`, on the next port) and points ``DATABASE_URL`` at both with
``target_session_attrs=read-write``, so the services follow a promotion.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from devtools.devstack.errors import DevStackError
from devtools.devstack.kafka import DEFAULT_KAFKA_VERSION, KafkaBroker, KafkaCluster
from devtools.devstack.ports import (
    DEFAULT_KAFKA_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    KAFKA_CONTROLLER_PORT_ENV,
    KAFKA_PORT_ENV,
    POSTGRES_PORT_ENV,
    port_from_env,
)
from devtools.devstack.postgres import PostgresServer, PostgresStandby, multi_host_dsn
from devtools.devstack.process import start_all, stop_all
from shared.lifecycle import Lifecycle

__all__ = [
    "DATABASE_URL_ENV",
    "KAFKA_BOOTSTRAP_SERVERS_ENV",
    "KAFKA_BROKERS_ENV",
    "POSTGRES_STANDBY_ENV",
    "LocalStack",
    "kafka_brokers_from_env",
]

_log = logging.getLogger(__name__)

KAFKA_BOOTSTRAP_SERVERS_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DATABASE_URL_ENV = "DATABASE_URL"
POSTGRES_STANDBY_ENV = "CARGOTRACK_POSTGRES_STANDBY"
KAFKA_BROKERS_ENV = "CARGOTRACK_KAFKA_BROKERS"
#: Node counts the local stack supports: one broker, or a cluster that survives
#: losing any one node with min.insync.replicas=2.
KAFKA_BROKER_COUNTS = (1, 3)


def kafka_brokers_from_env(environ: Mapping[str, str]) -> int:
    """``CARGOTRACK_KAFKA_BROKERS``: 1 (unset or empty) or 3.

    Raises :class:`DevStackError` naming the variable for any other value.
    """
    raw = environ.get(KAFKA_BROKERS_ENV, "").strip()
    if not raw:
        return 1
    if raw not in {str(n) for n in KAFKA_BROKER_COUNTS}:
        raise DevStackError(
            f"{KAFKA_BROKERS_ENV} must be 1 (one broker) or 3 (a replicated cluster), got {raw!r}"
        )
    return int(raw)


class LocalStack(Lifecycle):
    """A Kafka broker and a PostgreSQL server, started together, stopped together.

    Guarantees:

    * :meth:`start` starts both servers concurrently and returns when both are ready.
      If either fails (or ``start`` is cancelled), the other is stopped too and the
      first error — a one-line :class:`~devtools.devstack.errors.DevStackError` for
      expected problems — propagates; nothing is left running.
    * :meth:`stop` stops whatever this object started (never an external server) and
      is idempotent. ``async with`` does both.
    * ``keep_data=True`` keeps the Kafka log and the PostgreSQL data across starts;
      ``False`` gives both a fresh, empty start. They are kept or wiped *together*
      because consumers store their Kafka offsets in PostgreSQL: offsets kept in a
      database whose topics were wiped would point past the end of the new topics.

    * ``kafka_brokers=3`` runs a :class:`KafkaCluster` (3 nodes, state in
      ``<state_dir>/kafka/node-N``) instead of one :class:`KafkaBroker`; the first
      node listens on ``kafka_port``/``kafka_controller_port``, the others two ports
      further each.
    * ``postgres_standby=True`` also runs a hot standby of that PostgreSQL, started
      after it, on the port after its port (or a free one), with state in
      ``<state_dir>/postgres-standby``; :attr:`database_url` then names both.

    State lives in ``<state_dir>/kafka`` and ``<state_dir>/postgres``.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        kafka_port: int | None = None,
        kafka_controller_port: int | None = None,
        postgres_port: int | None = None,
        bootstrap_servers: str | None = None,
        database_url: str | None = None,
        keep_data: bool = True,
        postgres_fsync: bool = True,
        kafka_version: str = DEFAULT_KAFKA_VERSION,
        kafka_brokers: int = 1,
        postgres_standby: bool = False,
    ) -> None:
        """``bootstrap_servers`` / ``database_url``, when given, are external servers to
        use instead of starting our own. Ports left as None are chosen free at start."""
        self._state_dir = Path(state_dir).absolute()
        self._external_bootstrap = bootstrap_servers
        self._external_database_url = database_url
        self._keep_data = keep_data
        self.kafka: KafkaBroker | KafkaCluster | None = None
        """The broker or cluster this stack runs, or None when Kafka is external."""
        self.postgres: PostgresServer | None = None
        """The PostgreSQL server this stack runs, or None when it is external."""
        if bootstrap_servers is None and kafka_brokers > 1:
            self.kafka = KafkaCluster(
                self._state_dir / "kafka",
                kafka_brokers,
                kafka_version,
                kafka_port,
                controller_port=kafka_controller_port,
            )
        elif bootstrap_servers is None:
            self.kafka = KafkaBroker(
                self._state_dir / "kafka",
                kafka_version,
                kafka_port,
                controller_port=kafka_controller_port,
            )
        self.postgres_standby: PostgresStandby | None = None
        """The standby of :attr:`postgres`, when asked for."""
        if database_url is None:
            self.postgres = PostgresServer(
                self._state_dir / "postgres", postgres_port, fsync=postgres_fsync
            )
            if postgres_standby:
                self.postgres_standby = PostgresStandby(
                    self._state_dir / "postgres-standby",
                    self.postgres,
                    None if postgres_port is None else postgres_port + 1,
                    fsync=postgres_fsync,
                )
        self._started = False
        self._lock = asyncio.Lock()

    @classmethod
    def for_dev(
        cls, state_dir: Path, environ: Mapping[str, str] = os.environ, *, reset: bool = False
    ) -> LocalStack:
        """The stack of ``cargotrack dev``: fixed ports, durable data.

        Ports default to 19092 (Kafka), 19093 (KRaft controller) and 15432 (PostgreSQL)
        and move with ``CARGOTRACK_KAFKA_PORT``, ``CARGOTRACK_KAFKA_CONTROLLER_PORT`` and
        ``CARGOTRACK_POSTGRES_PORT``. Data is kept across runs unless ``reset``.
        Honours ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and
        ``CARGOTRACK_KAFKA_BROKERS``. Raises
        :class:`~devtools.devstack.errors.DevStackError` for a malformed variable.
        """
        return cls(
            state_dir,
            kafka_port=port_from_env(environ, KAFKA_PORT_ENV, DEFAULT_KAFKA_PORT),
            kafka_controller_port=port_from_env(
                environ, KAFKA_CONTROLLER_PORT_ENV, DEFAULT_KAFKA_CONTROLLER_PORT
            ),
            postgres_port=port_from_env(environ, POSTGRES_PORT_ENV, DEFAULT_POSTGRES_PORT),
            bootstrap_servers=environ.get(KAFKA_BOOTSTRAP_SERVERS_ENV) or None,
            database_url=environ.get(DATABASE_URL_ENV) or None,
            keep_data=not reset,
            kafka_brokers=kafka_brokers_from_env(environ),
            postgres_standby=environ.get(POSTGRES_STANDBY_ENV) == "1",
        )

    @classmethod
    def for_tests(cls, state_dir: Path, environ: Mapping[str, str] = os.environ) -> LocalStack:
        """The stack of the test suite: free ports, fresh data, ``fsync=off``.

        Honours ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` (for example to run the
        suite against servers provided by CI), and ``CARGOTRACK_KAFKA_BROKERS``.
        """
        return cls(
            state_dir,
            bootstrap_servers=environ.get(KAFKA_BOOTSTRAP_SERVERS_ENV) or None,
            database_url=environ.get(DATABASE_URL_ENV) or None,
            keep_data=False,
            postgres_fsync=False,
            kafka_brokers=kafka_brokers_from_env(environ),
        )

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap servers (``host:port[,...]``). RuntimeError before start."""
        if self.kafka is None:
            assert self._external_bootstrap is not None
            return self._external_bootstrap
        return self.kafka.bootstrap_servers

    @property
    def database_url(self) -> str:
        """PostgreSQL connection URL. RuntimeError before start."""
        if self.postgres is None:
            assert self._external_database_url is not None
            return self._external_database_url
        if self.postgres_standby is not None:
            return multi_host_dsn([self.postgres, self.postgres_standby])
        return self.postgres.dsn

    @property
    def kafka_brokers(self) -> list[KafkaBroker]:
        """Every Kafka node this stack runs (none when Kafka is external)."""
        if isinstance(self.kafka, KafkaCluster):
            return list(self.kafka.brokers)
        return [] if self.kafka is None else [self.kafka]

    def topic_env(self) -> dict[str, str]:
        """Topic settings the stack's Kafka needs: on a cluster, its replication
        factor and min.insync.replicas; nothing for one broker or an external Kafka."""
        return self.kafka.topic_env() if isinstance(self.kafka, KafkaCluster) else {}

    def env(self) -> dict[str, str]:
        """The environment variables that point a service process at this stack."""
        return {
            KAFKA_BOOTSTRAP_SERVERS_ENV: self.bootstrap_servers,
            DATABASE_URL_ENV: self.database_url,
            **self.topic_env(),
        }

    def describe(self) -> list[str]:
        """One human-readable line per server: where it listens and where it logs."""
        lines = []
        if self.kafka is None:
            lines.append(
                f"Kafka       {self.bootstrap_servers} (external, {KAFKA_BOOTSTRAP_SERVERS_ENV})"
            )
        elif isinstance(self.kafka, KafkaCluster):
            lines.append(
                f"Kafka       {self.bootstrap_servers} (Apache Kafka {self.kafka.version}, "
                f"{len(self.kafka.brokers)} nodes, replication factor "
                f"{self.kafka.replication_factor}, logs "
                f"{', '.join(str(b.log_path) for b in self.kafka.brokers)})"
            )
        else:
            lines.append(
                f"Kafka       {self.bootstrap_servers} (Apache Kafka {self.kafka.version}, "
                f"log {self.kafka.log_path})"
            )
        if self.postgres is None:
            lines.append(f"PostgreSQL  {self.database_url} (external, {DATABASE_URL_ENV})")
        else:
            lines.append(f"PostgreSQL  {self.database_url} (log {self.postgres.log_path})")
            if self.postgres_standby is not None:
                lines.append(
                    f"PostgreSQL  standby on port {self.postgres_standby.port}, streaming "
                    f"(log {self.postgres_standby.log_path})"
                )
        return lines

    async def start(self) -> None:
        """Start the servers this stack owns, concurrently; see the class guarantees.

        A no-op while started.
        """
        async with self._lock:
            if self._started:
                return
            starts: dict[str, Coroutine[Any, Any, None]] = {}
            if self.kafka is not None:
                starts["kafka"] = self.kafka.start(keep_data=self._keep_data)
            if self.postgres is not None:
                starts["postgres"] = self._start_postgres()
            await start_all(starts, undo=self._stop_servers)
            self._started = True
            for line in self.describe():
                _log.info("devstack: %s", line)

    async def _start_postgres(self) -> None:
        assert self.postgres is not None
        await self.postgres.start(keep_data=self._keep_data)
        if self.postgres_standby is not None:  # its first start copies the primary
            await self.postgres_standby.start(keep_data=self._keep_data)

    async def stop(self) -> None:
        """Stop the servers this stack started (both, even if one fails). Idempotent."""
        async with self._lock:
            self._started = False
            await self._stop_servers()

    async def _stop_servers(self) -> None:
        servers: list[KafkaBroker | KafkaCluster | PostgresServer] = [
            s for s in (self.kafka, self.postgres, self.postgres_standby) if s is not None
        ]
        await stop_all([s.stop() for s in servers])
