"""PostgreSQL access: the connection pool and schema migrations.

Every cargotrack table lives in one schema (CARGOTRACK_DB_SCHEMA), set as the
search_path of each pooled connection; tests give each test its own schema.
Migrations are the numbered SQL files in shared/migrations/, applied in order,
each in its own transaction, recorded in schema_migrations, under an advisory
lock so that concurrent starters apply each exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.config import DatabaseSettings
from shared.runtime import Backoff

#: A connection as handed out by a pool or opened directly; every query helper takes either.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
#: Arbitrary constant: the advisory lock key that serialises migrations.
_MIGRATION_LOCK = 0x6361_7267_6F74
#: Failures that mean "PostgreSQL is not answering yet": refused, unresolvable or
#: timed-out connections, a server still starting up, and (a DATABASE_URL naming
#: several hosts with target_session_attrs=read-write) no host accepting writes yet,
#: as while a standby is being promoted. Anything else (a wrong password, a missing
#: database) is a configuration error and fails at once.
NOT_ANSWERING: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


#: What asyncpg raises when PostgreSQL cannot be reached or went away mid-call (e.g.
#: "connection is closed" between two calls), or when none of several hosts accepts
#: writes (a failover in progress): worth a retry, never a client's fault.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


class DatabaseUnavailable(Exception):
    """PostgreSQL did not answer within the time allowed; the message says how long."""


async def when_answering(
    attempt: Callable[[], Awaitable[T]],
    *,
    wait_s: float,
    what: str = "PostgreSQL",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `attempt` until it stops failing with a NOT_ANSWERING error, for up to wait_s.

    Retries 1 s, 2 s, 4 s, then every 10 s apart, logging a warning per failed attempt
    (the error, the next try, the time left). Returns the first result; raises
    DatabaseUnavailable (naming the attempts, the seconds waited and the last error)
    once wait_s has passed. Other errors propagate at once.
    """
    start = clock()
    backoff = Backoff(1.0, 10.0)
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except NOT_ANSWERING as error:
            waited = clock() - start
            left = wait_s - waited
            reason = f"{type(error).__name__}: {error}"
            if left <= 0:
                raise DatabaseUnavailable(
                    f"{what} did not answer in {waited:.0f} s ({attempts} attempt(s),"
                    f" allowed {wait_s:g} s); last error: {reason}"
                ) from error
            pause = min(backoff.next(), left)
            log.warning(
                "%s not answering (%s); attempt %d in %.0f s, giving up in %.0f s",
                what,
                reason,
                attempts + 1,
                pause,
                left,
            )
            await sleep(pause)


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped, in version order."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def connect(settings: DatabaseSettings) -> asyncpg.Connection:
    """One connection with the cargotrack schema on its search_path."""
    return await asyncpg.connect(settings.url, server_settings={"search_path": settings.schema})


async def create_pool(settings: DatabaseSettings, **overrides: Any) -> asyncpg.Pool:
    """A started pool whose connections use the cargotrack schema; close() it when done."""
    options: dict[str, Any] = {
        "min_size": settings.pool_min,
        "max_size": settings.pool_max,
        "server_settings": {"search_path": settings.schema},
        "command_timeout": 60,
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(settings.url, **options)
    assert pool is not None
    return pool


#: The read-only role of tracking-query and of delivery-confirmations' read-model
#: pre-check (k8s/base/postgres/cluster.yaml creates it as a CloudNativePG managed
#: role). `migrate` grants it reading the schema, present and future tables. The
#: projector's role is a member of the owner role instead (it creates and drops the
#: daily position partitions); gps-ingest, shipment-events and dispatch have no
#: database role at all.
READ_ONLY_ROLE = "cargotrack_query"


async def grant_read_only(connection: asyncpg.Connection[Any], schema: str) -> bool:
    """Let READ_ONLY_ROLE read every table of `schema`, now and later (tables the
    migrating role creates); nothing else. False (and nothing done) when the role
    does not exist, as in the local stack. Idempotent."""
    exists = await connection.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", READ_ONLY_ROLE
    )
    if not exists:
        return False
    role, quoted = f'"{READ_ONLY_ROLE}"', f'"{schema}"'
    await connection.execute(f"GRANT USAGE ON SCHEMA {quoted} TO {role}")
    await connection.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {quoted} TO {role}")
    await connection.execute(
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {quoted} GRANT SELECT ON TABLES TO {role}"
    )
    return True


async def migrate(settings: DatabaseSettings, *, wait_s: float = 0.0) -> list[str]:
    """Create the schema if needed and apply pending migrations; return the files applied.

    Then grants the read-only role (READ_ONLY_ROLE) reading the schema, if that role
    exists. Idempotent and safe to run from several processes at once. With wait_s
    above 0 a PostgreSQL that does not answer yet is retried for that long
    (`when_answering`), then DatabaseUnavailable; with 0 (the services' start-up) the
    connection error itself is raised at once.
    """

    def connect() -> Awaitable[asyncpg.Connection]:
        return asyncpg.connect(settings.url)

    connection = await (when_answering(connect, wait_s=wait_s) if wait_s > 0 else connect())
    try:
        schema = settings.schema
        await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await connection.execute(f'SET search_path TO "{schema}"')
        await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                row["version"]
                for row in await connection.fetch("SELECT version FROM schema_migrations")
            }
            applied = []
            for version, name, sql in migrations():
                if version in done:
                    continue
                async with connection.transaction():
                    await connection.execute(sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(name)
            await grant_read_only(connection, schema)
            return applied
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await connection.close()


class SchemaBehind(Exception):
    """The schema lacks migrations and this role may not apply them."""


async def migrate_or_check(settings: DatabaseSettings) -> list[str]:
    """`migrate`, or, for a role that may not (READ_ONLY_ROLE: tracking-query in
    Kubernetes), check that no migration is pending.

    Returns the files applied (empty when only checked). Raises SchemaBehind naming
    the pending migrations when the role may not migrate and the schema is behind:
    run `cargotrack migrate` (the migration Job) first.
    """
    try:
        return await migrate(settings)
    except asyncpg.InsufficientPrivilegeError as error:
        refused = error
    connection = await asyncpg.connect(settings.url)
    try:
        try:
            rows = await connection.fetch(
                f'SELECT version FROM "{settings.schema}".schema_migrations'
            )
        except asyncpg.PostgresError:
            rows = []
    finally:
        await connection.close()
    done = {row["version"] for row in rows}
    pending = [name for version, name, _sql in migrations() if version not in done]
    if pending:
        raise SchemaBehind(
            f"schema {settings.schema!r} lacks migrations {', '.join(pending)} and this "
            f"role may not apply them ({refused}); run `cargotrack migrate` first"
        ) from refused
    return []


def as_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows transposed into one list per column.

    The arguments of ``INSERT ... SELECT * FROM unnest($1::text[], $2::...[], ...)``,
    which writes thousands of rows in one statement: ``executemany`` executes the
    statement once per row, several times slower for a projector's batch. Rows must
    not repeat a conflict key when the statement says ON CONFLICT DO UPDATE.
    """
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]
