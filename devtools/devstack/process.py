"""Child processes of the devstack: started in their own session, never outliving us.

Processes are driven with :class:`subprocess.Popen` and awaited from the event loop (a
pidfd on Linux) rather than with ``asyncio.create_subprocess_exec``: that works from
any event loop (pytest may close the loop that started a process before another one
stops it) and needs no child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from devtools.devstack.errors import DevStackError
from shared.lifecycle import Lifecycle

__all__ = [
    "ChildProcess",
    "ensure_writable_dir",
    "log_tail",
    "run_command",
    "start_all",
    "stop_all",
]

_POLL_INTERVAL = 0.05
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _libc_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()


def _parent_death_prefix() -> list[str]:
    """A command prefix asking Linux to SIGKILL the child when its parent dies.

    Without it a broker or postmaster would outlive a test run killed with SIGKILL (or
    a ``cargotrack dev`` whose terminal closed) and keep the ports taken. util-linux's
    ``setpriv --pdeathsig`` sets it and then execs the command (same pid, same
    parent). A Python ``preexec_fn`` would do the same in-process, but running Python
    between fork and exec in a process with threads (grpc's, asyncpg's) can crash the
    child, so it is not used. Linux delivers the signal when the *thread* that
    forked the child exits: spawn from the event loop thread, not a worker thread.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and sys.platform == "linux" else []


_PDEATHSIG_PREFIX = _parent_death_prefix()


def _become_subreaper() -> None:
    """Make orphaned descendants of this process its children rather than PID 1's.

    Used before crash-killing a server that has children of its own (PostgreSQL's
    backends): they become ours, so :meth:`ChildProcess.kill` can reap them and return
    with no process — not even a zombie — left, whatever PID 1 does (in containers it
    often reaps late or never). Linux only; elsewhere the orphans go to PID 1 as usual.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (with parents) and prove it is writable by creating a file in it.

    ``os.access`` is not enough: it says yes to root on a read-only file system.
    Raises :class:`DevStackError` naming the directory on failure. Returns ``path``.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DevStackError(
            f"{what} directory {path} is not writable ({err.strerror or err}); "
            "choose a writable state directory or fix its permissions"
        ) from None
    return path


def log_tail(path: Path, lines: int = 5, max_chars: int = 400) -> str:
    """The last non-empty ``lines`` lines of ``path`` joined by ``" | "``, or ``""``.

    Never raises: used while building error messages.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= max_chars else "…" + joined[-max_chars:]


def _process_gone(pid: int) -> bool:
    """True if ``pid`` does not exist or is a zombie (it no longer holds resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # The state letter follows the command name, which is in parentheses and may
    # itself contain spaces or parentheses.
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child (never blocks); True once it is gone."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: gone, or someone else's to reap
        return _process_gone(pid)
    return reaped == pid


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc scan; empty elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


class ChildProcess:
    """A long-running server process in its own session, output appended to a log file.

    Guarantees: :meth:`terminate` and :meth:`kill` are idempotent and return only when
    the process (and, for :meth:`kill`, its direct children) are gone; on Linux the
    process gets SIGKILL if the Python process that started it dies.
    """

    def __init__(self, popen: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
        self._popen = popen
        self.name = name
        self.log_path = log_path

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path,
        append_log: bool,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> ChildProcess:
        """Start ``argv`` with stdout and stderr going to ``log_path``.

        ``append_log=False`` truncates the log first. ``user`` runs the process as that
        system user (requires root). A new session keeps terminal signals (Ctrl-C) away
        from the child so the stack shuts it down in order, and lets us signal its group.
        """
        with log_path.open("ab" if append_log else "wb") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    [*_PDEATHSIG_PREFIX, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=None if env is None else dict(env),
                    user=user,
                    start_new_session=True,
                )
            except OSError as err:
                raise DevStackError(f"could not start {name} ({argv[0]}): {err}") from None
        return cls(popen, name, log_path)

    @property
    def pid(self) -> int:
        """The operating-system process id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or ``None`` while the process runs (negative: killed by signal)."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._popen.poll() is None

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process itself; a no-op once it has exited."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)

    async def wait(self) -> int:
        """Wait until the process exits and return its exit status.

        Unbounded: wrap it in ``asyncio.timeout``. On Linux the wake-up is event driven
        (a pidfd becomes readable when the process exits); elsewhere it polls.
        """
        if (code := self._popen.poll()) is not None:
            return code
        try:
            pidfd = os.pidfd_open(self._popen.pid)
        except (AttributeError, OSError):
            return await self._poll_until_exit()
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            while (code := self._popen.poll()) is None:
                await exited.wait()
            return code
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    async def _poll_until_exit(self) -> int:
        while (code := self._popen.poll()) is None:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(_POLL_INTERVAL)
        return code

    async def terminate(self, sig: signal.Signals, grace: float) -> None:
        """Ask the process to stop with ``sig``; SIGKILL it if it is still up after ``grace``.

        Idempotent: returns at once when the process has already exited.
        """
        if self._popen.poll() is not None:
            return
        self.send_signal(sig)
        try:
            async with asyncio.timeout(grace):
                await self.wait()
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the process, its process group and its direct children; wait until gone.

        The process is frozen (SIGSTOP) before its children are listed, so it can
        neither fork new ones nor reap the listed ones meanwhile; the children (which a
        server may have put in sessions of their own, as PostgreSQL does) are adopted
        and reaped by us. Returns when all are gone (bounded to about 10 s). Idempotent.
        """
        pid = self._popen.pid
        children: list[int] = []
        if self._popen.poll() is None:
            self.send_signal(signal.SIGSTOP)
            children = _children(pid)
            if children:
                _become_subreaper()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.send_signal(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await self.wait()
        # The parent is reaped, so its children have been re-parented (to us when we
        # are their subreaper): reap them, or at least see them die.
        pending = set(children)
        deadline = time.monotonic() + 10.0
        while pending and time.monotonic() < deadline:
            pending = {child for child in pending if not _reap(child)}
            if pending:
                await asyncio.sleep(_POLL_INTERVAL)

    def kill_now(self) -> None:
        """Synchronous last-resort SIGKILL of the process group (for ``__del__``)."""
        if self._popen.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(self._popen.pid, signal.SIGKILL)


async def run_command(
    argv: Sequence[str],
    *,
    name: str,
    log_path: Path,
    time_limit: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
) -> int:
    """Run a short-lived command to completion, output to ``log_path``; return its exit code.

    After ``time_limit`` seconds the command is killed and :class:`DevStackError` (naming
    the log) raised; on cancellation it is killed before the cancellation propagates.
    """
    child = ChildProcess.spawn(
        argv, name=name, log_path=log_path, append_log=False, cwd=cwd, env=env, user=user
    )
    try:
        async with asyncio.timeout(time_limit):
            return await child.wait()
    except TimeoutError:
        raise DevStackError(
            f"{name} did not finish within {time_limit:.0f} s; see {log_path}"
        ) from None
    finally:
        await child.kill()


class ServerProcess(Lifecycle):
    """The lifecycle every local server shares: start, stop, kill, restart, ``async with``.

    Subclasses set ``_stop_signal`` (the server's graceful-shutdown signal) and
    ``_default_keep_data``, and implement ``_start(keep_data)``, which must set
    ``self._proc``. Guarantees: ``start`` is idempotent while running and kills
    whatever it launched if it fails or is cancelled; ``stop`` and ``kill`` are
    idempotent; a server never stopped is killed (with a ResourceWarning) when
    the object is collected.
    """

    _stop_signal: signal.Signals = signal.SIGTERM
    _default_keep_data: bool = True

    def __init__(self, state_dir: Path, stop_timeout: float) -> None:
        self._state_dir = Path(state_dir).absolute()
        self._stop_timeout = stop_timeout
        self._proc: ChildProcess | None = None
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        """True while the server process is up."""
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def process(self) -> ChildProcess | None:
        """The server's latest process, also after it died; None before start, after stop."""
        return self._proc

    async def start(self, *, keep_data: bool | None = None) -> None:
        """Start the server and wait until it serves (see the subclass guarantees).

        Raises :class:`DevStackError` (one line, naming the fix) for expected failures.
        """
        async with self._lock:
            if self.running:
                return
            try:
                await self._start(self._default_keep_data if keep_data is None else keep_data)
            except BaseException:
                await self._discard()
                raise

    async def stop(self) -> None:
        """Stop gracefully (``_stop_signal``; SIGKILL after the stop timeout). Idempotent."""
        async with self._lock:
            if self._proc is not None:
                await self._proc.terminate(self._stop_signal, self._stop_timeout)
                self._proc = None

    async def kill(self) -> None:
        """Crash the server with SIGKILL (fault tests); returns once it is gone. Idempotent."""
        async with self._lock:
            await self._discard()

    async def restart(self) -> None:
        """Stop gracefully, then start again on the same ports keeping the data."""
        await self.stop()
        await self.start(keep_data=True)

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.running:
            warnings.warn(
                f"{type(self).__name__} {self._state_dir} was not stopped; killing pid {proc.pid}",
                ResourceWarning,
                stacklevel=1,
            )
            proc.kill_now()

    async def _discard(self) -> None:
        if self._proc is not None:
            await self._proc.kill()
            self._proc = None

    async def _start(self, keep_data: bool) -> None:
        raise NotImplementedError


async def start_all(
    starts: Mapping[str, Coroutine[Any, Any, None]], *, undo: Callable[[], Awaitable[None]]
) -> None:
    """Run the ``starts`` concurrently, each as a task named by its key; return once all
    have succeeded.

    As soon as one fails (or this is cancelled), the others are cancelled and awaited
    to their end (a server's start kills what it launched when cancelled or failing),
    then ``undo()`` is awaited and the first failure re-raised.
    """
    tasks = [asyncio.create_task(start, name=name) for name, start in starts.items()]
    try:
        # Without return_exceptions, gather raises the first failure at once.
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await undo()
        raise


async def stop_all(stops: Sequence[Awaitable[None]]) -> None:
    """Await every one of ``stops`` concurrently, all to their end even if some fail; then
    re-raise the first failure (in the order given), if any."""
    results = await asyncio.gather(*stops, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
