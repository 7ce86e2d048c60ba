"""Fixtures shared by every test suite.

One local stack (a real Kafka broker and a real PostgreSQL) per test session, started
only when a test asks for it; every test gets its own topic prefix and its own schema,
so tests never see each other's data. Set ``KAFKA_BOOTSTRAP_SERVERS`` and/or
``DATABASE_URL`` to run against servers that already exist instead.
"""

from __future__ import annotations

import os

# Before anything imports grpc: its fork handlers can crash a child forked while
# grpc threads are busy, and every child here execs at once, so they buy nothing.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, settings

from devtools.devstack import DevStackError, KafkaBroker, LocalStack
from tests.projection_helpers import fresh_schema

# Shared machines are noisy: no per-example deadline. The explain phase is left out
# because on Python 3.11 it can take longer than the test timeout after a failure,
# hiding the failing example behind a timeout.
# Every failure prints its reproduction blob (`@reproduce_failure(...)`): a rare
# counterexample found in CI can be replayed locally.
settings.register_profile(
    "cargotrack",
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
# CI (`.ci/run` sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a
# red build is red again when re-run, and no example database is needed.
settings.register_profile("ci", parent=settings.get_profile("cargotrack"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cargotrack"))


@contextlib.contextmanager
def server_state_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory for a local server's state, removed afterwards.

    Not under pytest's tmp_path: pytest keeps its root directory private (mode
    0700) and re-tightens it whenever a pytest session starts, while PostgreSQL
    runs as another system user that must reach its data directory.
    """
    path = Path(tempfile.mkdtemp(prefix=f"cargotrack-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state directory for a `cargotrack dev` run or a dedicated stack."""
    with server_state_dir("state") as path:
        yield path


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[LocalStack]:
    """The session's local stack, started once, stopped after the last test.

    An expected start failure (no Java, port taken, ...) fails the tests that need the
    stack with its one-line message instead of a stack trace.
    """
    with server_state_dir("devstack") as state:
        local = LocalStack.for_tests(state)
        problem: DevStackError | None = None
        try:
            await local.start()
        except DevStackError as err:
            problem = err
        if problem is not None:  # failed outside the except block: no chained traceback
            pytest.fail(f"local stack did not start: {problem}", pytrace=False)
        try:
            yield local
        finally:
            await local.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: LocalStack) -> str:
    """Bootstrap servers of the session's Kafka broker."""
    return stack.bootstrap_servers


@pytest.fixture(scope="session")
def database_url(stack: LocalStack) -> str:
    """Connection URL of the session's PostgreSQL (superuser, database ``postgres``)."""
    return stack.database_url


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test, e.g. ``"t1a2b3c4d5e."``: name every topic and group with it."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
async def pg_schema(database_url: str) -> AsyncIterator[str]:
    """A fresh schema unique to this test, dropped with everything in it afterwards.

    No connection is held in between, so a test may stop and restart PostgreSQL.
    """
    async with fresh_schema(database_url) as name:
        yield name


@pytest.fixture
async def db_pool(database_url: str, pg_schema: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """An asyncpg pool whose connections resolve unqualified names in :func:`pg_schema`."""
    pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, server_settings={"search_path": pg_schema}
    )
    try:
        yield pool
    finally:
        try:
            async with asyncio.timeout(10):
                await pool.close()
        except TimeoutError:
            # A test kept a connection acquired; do not let it hang the session.
            pool.terminate()


@pytest.fixture(scope="session")
async def _spare_broker() -> AsyncIterator[KafkaBroker]:
    """A second Kafka broker, started once per session by the first test that asks."""
    with server_state_dir("spare-kafka") as state:
        broker = KafkaBroker(state / "kafka")
        problem: DevStackError | None = None
        try:
            await broker.start(keep_data=False)
        except DevStackError as err:
            problem = err
        if problem is not None:
            pytest.fail(f"the dedicated broker did not start: {problem}", pytrace=False)
        try:
            yield broker
        finally:
            await broker.kill()


@pytest.fixture
async def dedicated_broker(_spare_broker: KafkaBroker) -> KafkaBroker:
    """A real broker of its own that the test may stop, kill and start again (keeping
    its data): running when the test starts. Shared by the session's tests, which
    name their topics with their own `topic_prefix` as on the main broker."""
    if not _spare_broker.running:
        await _spare_broker.start(keep_data=True)
    return _spare_broker
