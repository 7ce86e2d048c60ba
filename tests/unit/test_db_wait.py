"""`when_answering`: how `cargotrack migrate` waits for PostgreSQL (no I/O: a fake clock)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from shared.db import DatabaseUnavailable, when_answering


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, error: BaseException) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "connected"

    return calls, attempt


async def test_retries_until_postgres_answers_backing_off_and_logging_each_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    calls, attempt = failing(5, ConnectionRefusedError(111, "Connection refused"))
    with caplog.at_level(logging.WARNING, logger="shared.db"):
        result = await when_answering(
            attempt,
            wait_s=600,
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert result == "connected"
    assert len(calls) == 6
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5
    assert "ConnectionRefusedError" in warnings[0]
    assert "attempt 2 in 1 s" in warnings[0]


async def test_gives_up_after_the_allowed_time_naming_attempts_and_the_last_error() -> None:
    fake = FakeTime()
    calls, attempt = failing(
        1000, asyncpg.CannotConnectNowError("the database system is starting up")
    )
    with pytest.raises(DatabaseUnavailable) as raised:
        await when_answering(
            attempt,
            wait_s=30,
            clock=fake.clock,
            sleep=fake.sleep,
        )
    message = str(raised.value)
    assert "did not answer in 30 s" in message
    assert f"({len(calls)} attempt(s), allowed 30 s)" in message
    assert "starting up" in message
    assert sum(fake.sleeps) == 30  # the last pause is cut to the time left


async def test_a_configuration_error_is_not_retried() -> None:
    fake = FakeTime()
    calls, attempt = failing(1, asyncpg.InvalidPasswordError("password authentication failed"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await when_answering(
            attempt,
            wait_s=600,
            clock=fake.clock,
            sleep=fake.sleep,
        )
    assert len(calls) == 1
    assert fake.sleeps == []
