"""The benchmark's own stack: Kafka, PostgreSQL and every service as its own process.

`BenchStack` starts (or, given external servers, reuses) Kafka and PostgreSQL, then
each service with `cargotrack serve NAME` exactly as a container runs it, on free
ports, with its log in the run directory, and stops all of them (SIGTERM, then
SIGKILL after a grace) on exit. Service processes are what the RSS sampler and the
profiler look at.

Two instances of gps-ingest run: `gps-ingest` writes to the pipeline's GPS topic
(consumed by the projector); `gps-ingest-only` writes to a topic nobody consumes, for
the ingest-only measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from devtools.devstack import LocalStack
from devtools.devstack.ports import free_ports
from devtools.devstack.process import ChildProcess
from devtools.launcher import wait_serving
from services.registry import SERVICES
from shared.config import Settings, load_settings
from shared.lifecycle import Lifecycle

log = logging.getLogger(__name__)

PARTITIONS = 6
STOP_GRACE_S = 10.0


@dataclass
class Service:
    name: str
    kind: str
    port: int
    process: ChildProcess

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux /proc), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _service_of(process_name: str) -> str:
    """The service a bench process runs: `projector-2` is a second projector."""
    if process_name == "gps-ingest-only":
        return "gps-ingest"
    if process_name.startswith("projector-"):
        return "projector"
    return process_name


@dataclass
class StackOptions:
    run_dir: Path
    bootstrap_servers: str | None = None
    database_url: str | None = None
    fsync: bool = True
    with_dispatch: bool = True
    #: Projector processes, one consumer group (the scale-out of docs/operations.md).
    projectors: int = 1
    #: Extra environment for every service.
    environ: dict[str, str] = field(default_factory=dict)


class BenchStack(Lifecycle):
    """Kafka + PostgreSQL + services for one benchmark run (see module docstring)."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir
        tag = uuid.uuid4().hex[:8]
        external = options.bootstrap_servers is not None
        # Unique names when sharing servers with others (the test session's stack).
        self.prefix = f"bench{tag}." if external else "bench."
        self.ingest_prefix = f"benchingest{tag}." if external else "bench-ingest."
        self.raw_prefix = f"benchraw{tag}." if external else "bench-raw."
        self.schema = f"bench_{tag}" if options.database_url is not None else "bench"
        self.raw_schema = f"{self.schema}_raw"
        self.local = LocalStack(
            self.run_dir / "stack",
            bootstrap_servers=options.bootstrap_servers,
            database_url=options.database_url,
            keep_data=False,
            postgres_fsync=options.fsync,
        )
        self.services: dict[str, Service] = {}
        #: The http-gateway's HTTP port (None: no gateway in this run).
        self.http_port: int | None = None
        #: tracking-query's Prometheus port (its response cache's hit counts).
        self.query_metrics_port: int | None = None
        self._started: list[Service] = []
        self.settings: Settings | None = None
        self.ingest_settings: Settings | None = None

    # --- environment ----------------------------------------------------------------

    def env(self, prefix: str | None = None, port: int = 0) -> dict[str, str]:
        """The environment of a service process (or a cargotrack command) of this run."""
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CARGOTRACK_", "KAFKA_", "DATABASE_URL"))
        }
        environ.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.local.bootstrap_servers,
                "DATABASE_URL": self.local.database_url,
                "CARGOTRACK_DB_SCHEMA": self.schema,
                "CARGOTRACK_DEV_MODE": "1",
                "CARGOTRACK_GRPC_HOST": "127.0.0.1",
                "CARGOTRACK_GRPC_PORT": str(port),
                "CARGOTRACK_TOPIC_PREFIX": prefix or self.prefix,
                "CARGOTRACK_TOPIC_PARTITIONS": str(PARTITIONS),
                "CARGOTRACK_LOG_FORMAT": "json",
                "CARGOTRACK_SHUTDOWN_GRACE_S": "2",
                # GPS event times lie hours in the past (see bench.workload): without
                # this the wall-clock stale-tracking scan would flag every shipment.
                "CARGOTRACK_STALE_AFTER_MIN": "1000000",
                **self.options.environ,
            }
        )
        return environ

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self.local.start()
        self.settings = load_settings(self.env())
        self.ingest_settings = load_settings(self.env(self.ingest_prefix))
        await self._clean_schemas()
        # The projector migrates and creates topics; start it first, then the rest.
        await self._spawn(["projector"])
        rest = [f"projector-{n}" for n in range(2, self.options.projectors + 1)]
        rest += ["gps-ingest", "shipment-events", "tracking-query"]
        if self.options.with_dispatch and self._has_dispatch():
            rest.append("dispatch")
        await self._spawn(rest)
        await self._spawn(["gps-ingest-only"])
        # The HTTP face of tracking-query (4.http.rps); ready once dispatch is too.
        if "dispatch" in self.services:
            await self._spawn(["http-gateway"])

    @staticmethod
    def _has_dispatch() -> bool:
        try:
            import services.dispatch.app  # noqa: F401
        except ImportError:
            return False
        return True

    async def _clean_schemas(self) -> None:
        connection = await asyncpg.connect(self.local.database_url)
        try:
            for schema in (self.schema, self.raw_schema):
                await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()

    async def _spawn(self, names: list[str]) -> None:
        ports = free_ports(len(names))
        started = []
        for name, port in zip(names, ports, strict=True):
            kind = _service_of(name)
            prefix = self.ingest_prefix if name == "gps-ingest-only" else self.prefix
            env = self.env(prefix, port)
            if not SERVICES[kind].several_processes:
                # `--service-env CARGOTRACK_PROCESSES=N` is for the services that run
                # several processes (gps-ingest, tracking-query); the rest refuse it.
                env.pop("CARGOTRACK_PROCESSES", None)
            if kind == "tracking-query":
                (self.query_metrics_port,) = free_ports(1)
                env["CARGOTRACK_METRICS_PORT"] = str(self.query_metrics_port)
            if kind == "http-gateway":
                (self.http_port,) = free_ports(1)
                env["CARGOTRACK_HTTP_PORT"] = str(self.http_port)
                env["CARGOTRACK_GATEWAY_TRACKING_TARGET"] = self.services["tracking-query"].target
                env["CARGOTRACK_GATEWAY_DISPATCH_TARGET"] = self.services["dispatch"].target
            process = ChildProcess.spawn(
                [sys.executable, "-c", "from services.cli import main; main()", "serve", kind],
                name=name,
                log_path=self.run_dir / f"{name}.log",
                append_log=False,
                env=env,
            )
            service = Service(name, kind, port, process)
            self._started.append(service)
            self.services[name] = service
            started.append(service)
        await asyncio.gather(*(wait_serving(s.port, s.process, 120.0) for s in started))

    async def stop(self) -> None:
        services, self._started = self._started, []
        await asyncio.gather(
            *(s.process.terminate(signal.SIGTERM, STOP_GRACE_S) for s in services),
            return_exceptions=True,
        )
        if self.options.database_url is not None and self.settings is not None:
            with contextlib.suppress(Exception):
                await self._clean_schemas()
        await self.local.stop()

    # --- helpers --------------------------------------------------------------------

    def pids(self) -> Mapping[str, int]:
        return {name: s.pid for name, s in self.services.items() if s.process.running}

    def check_running(self) -> None:
        """Fail loudly if a service died (its log says why)."""
        for service in self.services.values():
            if not service.process.running:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}; "
                    f"see {service.process.log_path}"
                )
