"""Change notifications for WatchShipment: one LISTEN connection, fanned out in-process.

The migration's triggers `pg_notify('<schema>.shipment_changed', tenant || ':' ||
shipment)` whenever a shipments or shipment_tracking row is written (delivered on
commit, repeats within a transaction collapsed). `ChangeFeed` holds ONE dedicated
connection per process listening on that channel and wakes the subscriptions of the
key named in each notification.

A notification carries no state, only "this shipment changed": a watcher re-reads
the shipment. Hence each subscription's queue is bounded (one slot) and coalescing:
if a wake-up is already pending, another one adds nothing, so a burst of changes
costs a slow watcher one re-read, never unbounded memory.

No change is missed:
- subscribe before reading the initial state (`subscribe()` then read), so a change
  committed after the read wakes the subscription;
- when the connection is (re)established, LISTEN runs first and then EVERY
  subscription is woken, so whatever changed while nobody listened is re-read;
- a connection that dies silently is found by a periodic `SELECT 1`.
Wake-ups may be spurious (a reconnect, a payload shared by two keys); watchers
compare before sending.

The payload `*` (sent by `cargotrack rebuild` when it switches the tables) means
"every shipment may have changed": every subscription is woken.

Observers (`FeedObserver`; the response cache of services/tracking_query/cache.py)
are told, synchronously and before any subscription wakes, of each notification
taken, of the connection's loss and of each LISTEN established.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import asyncpg

from shared.config import DatabaseSettings
from shared.db import CONNECTION_ERRORS
from shared.runtime import Backoff

log = logging.getLogger(__name__)

#: How often the idle LISTEN connection is probed, and how long a probe may take.
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 10.0
#: Back-off between reconnection attempts (doubling up to the maximum).
RECONNECT_BACKOFF_S = 0.1
RECONNECT_BACKOFF_MAX_S = 5.0

#: A notification's payload meaning "every shipment may have changed".
EVERYTHING = "*"

Connect = Callable[[], Awaitable["asyncpg.Connection[Any]"]]


class FeedObserver(Protocol):
    """What the feed tells an observer; every call comes from the event loop."""

    def changed(self, key: str) -> None:
        """A notification for this key (`ChangeFeed.key`) was taken."""

    def everything_changed(self) -> None:
        """The `*` notification was taken: any shipment may have changed."""

    def lost(self) -> None:
        """The LISTEN connection is gone: notifications may be missed until `listening`."""

    def listening(self) -> None:
        """LISTEN is established (again): from now on every commit notifies."""


class Signal(enum.Enum):
    #: Something about the shipment may have changed: re-read it.
    CHANGED = "changed"
    #: The feed is closing (the server shuts down): end the watch.
    CLOSED = "closed"


class Subscription:
    """One watcher's wake-ups for one shipment (see `ChangeFeed.subscribe`)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._queue: asyncio.Queue[Signal] = asyncio.Queue(maxsize=1)
        self._closed = False

    def _wake(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(asyncio.QueueFull):
            # Full means a CHANGED is already pending: it covers this change too.
            self._queue.put_nowait(Signal.CHANGED)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(Signal.CLOSED)

    async def changed(self) -> bool:
        """Wait for the next wake-up: True means re-read the shipment, False means the
        feed closed and the watch should end. Returns at once if one is pending."""
        return await self._queue.get() is Signal.CHANGED


class ChangeFeed:
    """The process's LISTEN connection and the subscriptions it wakes.

    `run()` is a long-running task (give it to the Supervisor): it connects, LISTENs
    and reconnects with back-off whenever the connection fails, forever; it ends only
    when cancelled (closing its connection). `close()` ends every subscription, present
    and future, with `changed() == False`; idempotent. Subscriptions work whether or
    not the connection is up at the moment: the next (re)connection wakes them all.
    """

    def __init__(
        self,
        database: DatabaseSettings,
        *,
        connect: Connect | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.channel = f"{database.schema}.shipment_changed"
        self._connect: Connect = connect or (
            lambda: asyncpg.connect(
                database.url,
                timeout=CONNECT_TIMEOUT_S,
                server_settings={"application_name": f"cargotrack-watch:{database.schema}"[:63]},
            )
        )
        self._ping_interval_s = ping_interval_s
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._observers: list[FeedObserver] = []
        #: The connection `run()` holds, while it holds one.
        self._current: asyncpg.Connection[Any] | None = None
        self._closed = False
        self._listening = False
        #: How many times LISTEN was established (observability and tests).
        self.connections = 0
        self._state = asyncio.Condition()

    @staticmethod
    def key(tenant_id: str, shipment_id: str) -> str:
        """A notification's payload for a shipment (as the trigger builds it)."""
        return f"{tenant_id}:{shipment_id}"

    @property
    def listening(self) -> bool:
        return self._listening

    def observe(self, observer: FeedObserver) -> None:
        """Tell `observer` of every notification, loss and LISTEN from now on. Add it
        before `run()` starts, so that it hears the first LISTEN."""
        self._observers.append(observer)

    @property
    def watchers(self) -> int:
        return sum(len(subs) for subs in self._subscriptions.values())

    @contextlib.contextmanager
    def subscribe(self, tenant_id: str, shipment_id: str) -> Iterator[Subscription]:
        """Wake-ups for one shipment while the block runs. Subscribe first, then read
        the current state: a change after the read is then never missed."""
        subscription = Subscription(self.key(tenant_id, shipment_id))
        if self._closed:
            subscription._close()
        subscribers = self._subscriptions.setdefault(subscription.key, set())
        subscribers.add(subscription)
        try:
            yield subscription
        finally:
            subscribers.discard(subscription)
            if not subscribers and self._subscriptions.get(subscription.key) is subscribers:
                del self._subscriptions[subscription.key]

    def close(self) -> None:
        """End every watch (now and any started later). Idempotent."""
        self._closed = True
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription._close()

    async def wait_listening(self, connections: int = 1, timeout_s: float = 30.0) -> None:
        """Wait until LISTEN has been established at least `connections` times and is up."""
        async with asyncio.timeout(timeout_s), self._state:
            await self._state.wait_for(lambda: self._listening and self.connections >= connections)

    async def _set_listening(self, listening: bool) -> None:
        async with self._state:
            self._listening = listening
            if listening:
                self.connections += 1
            self._state.notify_all()

    def _on_notification(
        self, _connection: object, _pid: int, _channel: str, payload: object
    ) -> None:
        key = str(payload)
        if key == EVERYTHING:
            for observer in self._observers:
                observer.everything_changed()
            self._wake_all()
            return
        # Observers first: a woken watcher's re-read must not find a stale answer.
        for observer in self._observers:
            observer.changed(key)
        for subscription in self._subscriptions.get(key, ()):
            subscription._wake()

    def _lost(self) -> None:
        for observer in self._observers:
            observer.lost()

    def _wake_all(self) -> None:
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription._wake()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after any connection failure."""
        backoff = Backoff(RECONNECT_BACKOFF_S, RECONNECT_BACKOFF_MAX_S)
        failures = 0
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result when
                # it completes as the task is being cancelled, losing the cancellation
                # (and then this loop never ends at shutdown).
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    connection = await self._connect()
            except CONNECTION_ERRORS as error:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("cannot connect for LISTEN (attempt %d): %r", failures, error)
                await backoff.sleep()
                continue
            established = self.connections
            self._current = connection
            try:
                await self._listen(connection)
            except CONNECTION_ERRORS as error:
                log.warning("LISTEN connection lost, reconnecting: %r", error)
            finally:
                self._current = None
                self._lost()  # at once, before anything awaits
                await self._set_listening(False)
                await _close_quietly(connection)
            if self.connections > established:  # it worked for a while: retry promptly
                backoff.reset()
                failures = 0
            await backoff.sleep()

    async def _listen(self, connection: asyncpg.Connection[Any]) -> None:
        """LISTEN, wake everyone, then hold the connection until it fails (raises)."""
        lost = asyncio.Event()

        def terminated(closed: object) -> None:
            # The observers hear it now, not once the loop below notices; unless this
            # is run()'s own close of a connection already given up.
            if closed is self._current:
                self._lost()
            lost.set()

        connection.add_termination_listener(terminated)
        await connection.add_listener(self.channel, self._on_notification)
        # LISTEN is in effect: every transaction committing from now on notifies us,
        # and a read that starts now sees every one committed before.
        for observer in self._observers:
            observer.listening()
        await self._set_listening(True)
        log.info("listening on %s (connection %d)", self.channel, self.connections)
        # Changes committed while nobody listened sent notifications to no one.
        self._wake_all()
        while True:
            try:
                async with asyncio.timeout(self._ping_interval_s):
                    await lost.wait()
            except TimeoutError:
                await connection.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
            else:
                raise ConnectionError("the LISTEN connection was closed")


async def _close_quietly(connection: asyncpg.Connection[Any]) -> None:
    if connection.is_closed():
        return
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await connection.close()
    except CONNECTION_ERRORS:
        connection.terminate()
