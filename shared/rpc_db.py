"""A database connection for one gRPC call, for the servicers that read PostgreSQL.

Its own module because `shared.db` sits below `shared.rpc` in the import graph
(`shared.runtime` names both), so neither may import the other's side of this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import grpc

from shared.db import CONNECTION_ERRORS, Connection
from shared.rpc import Context

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def pooled_connection(
    pool: asyncpg.Pool, context: Context, *, timeout_s: float = 5.0
) -> AsyncIterator[Connection]:
    """A connection from `pool` for one call; the call ends UNAVAILABLE (retry) when
    the database cannot be reached within `timeout_s` or goes away during the call."""
    try:
        async with pool.acquire(timeout=timeout_s) as connection:
            yield connection
    except CONNECTION_ERRORS as error:
        log.warning("database unavailable: %r", error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable, retry")
        raise  # pragma: no cover  (abort raises; never swallow the error)
