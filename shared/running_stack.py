"""Where a running `cargotrack dev` stack is, for operator commands started beside it.

`cargotrack dev` writes the connection settings of its stack (Kafka, PostgreSQL, the
development signing key, topic prefix, schema, service ports) as environment
variables into ``<state dir>/running-stack.json`` (mode 0600: it holds the signing
key) once its services are ready, and removes the file when it stops. A file left
by a run that was killed is recognised as stale by its process id and ignored.

Operator commands (`cargotrack migrate`, `rebuild`, `token`, ...) take from it the
variables their own environment does not set (`stack_environment`), and
`cargotrack env` prints them as ``export`` lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "RUNNING_STACK_FILE",
    "RunningStack",
    "read_running_stack",
    "redact_url",
    "remove_running_stack",
    "stack_environment",
    "state_dir_from_env",
    "write_running_stack",
]

RUNNING_STACK_FILE = "running-stack.json"
STATE_DIR_ENV = "CARGOTRACK_STATE_DIR"


def state_dir_from_env(environ: Mapping[str, str] = os.environ) -> Path:
    """The `cargotrack dev` state directory: CARGOTRACK_STATE_DIR, default ./.cargotrack."""
    return Path(environ.get(STATE_DIR_ENV) or ".cargotrack").resolve()


@dataclass(frozen=True)
class RunningStack:
    """The settings a live `cargotrack dev` (process `pid`) wrote into `state_dir`."""

    state_dir: Path
    pid: int
    env: dict[str, str]

    def export_lines(self) -> list[str]:
        """``export NAME=value`` lines (shell-quoted), sorted by name."""
        return [f"export {name}={shlex.quote(value)}" for name, value in sorted(self.env.items())]

    def origin(self) -> str:
        return f"the cargotrack dev running in {self.state_dir} (pid {self.pid})"


def write_running_stack(state_dir: Path, env: Mapping[str, str], pid: int | None = None) -> Path:
    """Write the stack's settings (replacing any earlier file atomically), mode 0600.

    Returns the file's path. `pid` (default: this process) is how readers tell a live
    stack from a file left by a killed run.
    """
    path = state_dir / RUNNING_STACK_FILE
    partial = state_dir / f".{RUNNING_STACK_FILE}.{os.getpid()}"
    body = json.dumps({"pid": pid or os.getpid(), "env": dict(env)}, indent=2, sort_keys=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file existed with other bits
        os.write(fd, body.encode())
    finally:
        os.close(fd)
    os.replace(partial, path)
    return path


def remove_running_stack(state_dir: Path) -> None:
    """Remove the file (a no-op when it is not there)."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / RUNNING_STACK_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return not stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))
    return True


def read_running_stack(state_dir: Path) -> RunningStack | None:
    """The live stack of `state_dir`; None when there is no file, it is unreadable, or
    the process that wrote it is gone (a killed run: stale)."""
    try:
        data = json.loads((state_dir / RUNNING_STACK_FILE).read_text())
        pid = int(data["pid"])
        env = {str(k): str(v) for k, v in dict(data["env"]).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        return None
    return RunningStack(state_dir, pid, env)


def stack_environment(
    environ: Mapping[str, str], state_dir: Path
) -> tuple[dict[str, str], RunningStack | None, list[str]]:
    """`environ` completed with the running stack's settings it does not set itself.

    Returns the merged environment, the stack (None when none is running), and the
    names taken from the stack (empty when the environment set them all).
    """
    stack = read_running_stack(state_dir)
    if stack is None:
        return dict(environ), None, []
    taken = [name for name, value in stack.env.items() if not environ.get(name) and value]
    return {**environ, **{name: stack.env[name] for name in taken}}, stack, taken


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by ``***``, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
