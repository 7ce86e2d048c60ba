"""A driver's app GPS uplink: what docs/ingest.md asks of a StreamPoints client.

Guarantees:

* One stream at a time per device; every batch carries the device's next sequence
  (1, 2, 3, ...), assigned once, when the batch is submitted.
* Every batch is kept until gps-ingest answered it. Answers come in the order the
  batches were written; an answer for anything but the oldest unanswered batch is a
  protocol error: the stream is dropped and reopened.
* After a dropped stream (UNAVAILABLE, a server restart, a network drill) a new
  stream is opened with back-off, and every unanswered batch is written again, in
  its original order, with its original sequence, before any new batch.
* `ACCEPTED` and `PARTIALLY_ACCEPTED` / `REJECTED` answers are final: refused points
  are logged with the server's violations and never resent.
* Bounded memory: `wait_for_room()` blocks the producer while `max_unacked` batches
  wait for an answer (a real app would stop recording into an unbounded queue too).

Lifecycle: `start()` (once) opens the first stream in the background; `stop()` gives
unanswered batches up to `flush_s` to be answered, closes the stream with
`done_writing` when everything was answered, and cancels the background task.
`stop()` is idempotent and a no-op before `start()`; `async with` does both. `wait()`
re-raises an unexpected error of the background task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc

from devtools.fleet_simulator.stats import SimulatorStats
from shared.auth import STREAM_TOKEN_EXPIRED
from shared.lifecycle import Lifecycle
from shared.pb import gps_pb2, gps_pb2_grpc
from shared.runtime import Backoff

__all__ = ["GpsUplink", "Metadata"]

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

#: Stream errors after which reconnecting is the right thing to do; others are logged
#: as errors (a bug or a configuration problem) and retried at the slowest pace.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class _OutOfOrder(Exception):
    """An answer that does not match the oldest unanswered batch."""


class GpsUplink(Lifecycle):
    """One device's GPS stream to gps-ingest (see the module docstring)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        vehicle_id: str,
        device_id: str,
        metadata: Callable[[], Metadata],
        stats: SimulatorStats | None = None,
        max_unacked: int = 1000,
        backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self._stub = gps_pb2_grpc.GpsIngestServiceStub(channel)
        self.vehicle_id = vehicle_id
        self.device_id = device_id
        self._metadata = metadata
        self.stats = stats or SimulatorStats()
        self._max_unacked = max_unacked
        self._backoff = backoff_s
        self._unacked: collections.deque[gps_pb2.GpsBatch] = collections.deque()
        #: How many of `_unacked` (from the left) were written on the current stream.
        self._written = 0
        #: Sequences after whose write the app loses its stream (network drills).
        self._drops: set[int] = set()
        #: Sequences written at least once (to count resends).
        self._ever_written = 0
        self._next_sequence = 1
        self._wake = asyncio.Event()
        self._answered = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- producer side ---------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """Batches submitted and not answered yet."""
        return len(self._unacked)

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    def submit(self, points: Sequence[gps_pb2.GpsPoint], *, drop_stream: bool = False) -> int:
        """Queue one batch of `points`; return its sequence. Never blocks.

        `drop_stream` makes the app lose its stream right after writing this batch,
        before reading its answer (a network drill: the batch is resent).
        Raises RuntimeError after stop().
        """
        if self._closing or self._stopped:
            raise RuntimeError("GpsUplink is stopped")
        sequence = self._next_sequence
        self._next_sequence += 1
        batch = gps_pb2.GpsBatch(
            vehicle_id=self.vehicle_id, device_id=self.device_id, sequence=sequence, points=points
        )
        self._unacked.append(batch)
        if drop_stream:
            self._drops.add(sequence)
        self.stats.points_sent += len(points)
        self._wake.set()
        return sequence

    async def wait_for_room(self) -> None:
        """Return once fewer than `max_unacked` batches wait for an answer."""
        while len(self._unacked) >= self._max_unacked:
            self._answered.clear()
            await self._answered.wait()

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until every submitted batch was answered; True if so."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._unacked:
                    self._answered.clear()
                    await self._answered.wait()
        except TimeoutError:
            return False
        return True

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("GpsUplink.start() called twice")
        self.stats.devices += 1
        self._task = asyncio.create_task(self._run(), name=f"uplink:{self.device_id}")

    async def stop(self, flush_s: float = 2.0) -> None:
        """Flush (bounded), close the stream, stop. Idempotent; see the module docstring."""
        task = self._task
        if self._stopped or task is None:
            return
        self._stopped = True
        if task.done():
            return
        if not await self.flush(flush_s):
            log.warning(
                "%s: stopping with %d unanswered batch(es)", self.device_id, len(self._unacked)
            )
        self._closing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.wait({task})
        task.cancel()
        await asyncio.wait({task})

    async def wait(self) -> None:
        """Wait until the background task ends: it only does after stop(), or by
        raising an unexpected error (a bug), which this re-raises."""
        if self._task is None:
            raise RuntimeError("start() first")
        await asyncio.wait({self._task})
        if not self._task.cancelled():
            self._task.result()

    # -- the connection --------------------------------------------------------------

    async def _run(self) -> None:
        """Open stream after stream until closed, waiting a `Backoff` between them: it
        starts again from its first delay after a stream that ended normally or got
        answers; a failure that is not transient (a refused token, a bug) waits the
        longest delay, as retrying it fast would only repeat it."""
        backoff = Backoff(*self._backoff)
        while not self._closing:
            answered_before = self.stats.batches_acked
            hard_failure = False
            try:
                outcome = await self._one_stream()
            except grpc.aio.AioRpcError as error:
                self.stats.stream_errors += 1
                code = error.code()
                # A token that expired mid-stream is routine: the next stream mints anew.
                expired = (
                    code == grpc.StatusCode.UNAUTHENTICATED
                    and error.details() == STREAM_TOKEN_EXPIRED
                )
                if code in TRANSIENT or expired:
                    log.info("%s: stream ended (%s); reconnecting", self.device_id, code.name)
                else:
                    log.error(
                        "%s: stream failed: %s %s", self.device_id, code.name, error.details()
                    )
                    hard_failure = True
            except _OutOfOrder as error:
                self.stats.stream_errors += 1
                log.error("%s: %s; reconnecting", self.device_id, error)
            else:
                if outcome == "closed":
                    return
                if outcome == "dropped":
                    log.info("%s: lost the stream (network drill); reconnecting", self.device_id)
                else:
                    log.info("%s: the server ended the stream; reconnecting", self.device_id)
                backoff.reset()
            progressed = self.stats.batches_acked > answered_before
            if progressed:
                backoff.reset()  # the stream worked for a while: not a tight failure loop
            await asyncio.sleep(
                backoff.max_s if hard_failure and not progressed else backoff.next()
            )

    async def _one_stream(self) -> str:
        """Run one stream until it ends: "dropped" (drill), "ended" (the server ended it
        normally), "closed" (after stop()); raise the stream's error otherwise."""
        call = self._stub.StreamPoints(metadata=self._metadata())
        self._written = 0
        self.stats.streams_opened += 1
        writer = asyncio.create_task(self._write(call), name=f"uplink-write:{self.device_id}")
        reader = asyncio.create_task(self._read(call), name=f"uplink-read:{self.device_id}")
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and writer.exception() is None:
                if writer.result() == "dropped":
                    return "dropped"
                await reader  # closing: the server answers what is left, then ends
                return "closed"
            if reader not in done:
                # The write failed because the call ended: the reader says why.
                await asyncio.wait({reader}, timeout=2.0)
                if not reader.done():
                    writer.result()
            reader.result()
            return "closed" if self._closing else "ended"
        finally:
            for task in (writer, reader):
                task.cancel()
            call.cancel()
            await asyncio.wait({writer, reader})

    async def _write(self, call: grpc.aio.StreamStreamCall) -> str:
        while True:
            while self._written < len(self._unacked):
                batch = self._unacked[self._written]
                if batch.sequence < self._ever_written + 1:
                    self.stats.batches_resent += 1
                await call.write(gps_pb2.StreamPointsRequest(batch=batch))
                self._written += 1
                self.stats.batches_sent += 1
                self._ever_written = max(self._ever_written, batch.sequence)
                if batch.sequence in self._drops:
                    self._drops.discard(batch.sequence)
                    return "dropped"
            if self._closing:
                await call.done_writing()
                return "closed"
            self._wake.clear()
            await self._wake.wait()

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        """Take answers until the stream ends (returns on OK, raises AioRpcError else)."""
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._answer(response)

    def _answer(self, response: gps_pb2.StreamPointsResponse) -> None:
        if not self._unacked or response.sequence != self._unacked[0].sequence:
            oldest = self._unacked[0].sequence if self._unacked else None
            raise _OutOfOrder(
                f"answer for sequence {response.sequence}, oldest unanswered is {oldest}"
            )
        batch = self._unacked.popleft()
        self._written -= 1
        self.stats.batches_acked += 1
        self.stats.points_accepted += response.accepted_points
        refused = len(batch.points) - response.accepted_points
        if refused or response.outcome != gps_pb2.BATCH_OUTCOME_ACCEPTED:
            self.stats.points_refused += refused
            log.warning(
                "gps-ingest refused %d of %d point(s) of %s batch %d (%s): %s",
                refused,
                len(batch.points),
                self.vehicle_id,
                batch.sequence,
                gps_pb2.BatchOutcome.Name(response.outcome),
                "; ".join(f"{v.field}: {v.description}" for v in response.violations),
            )
        self._answered.set()
