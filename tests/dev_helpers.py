"""Helpers for tests that run `cargotrack dev` as a process, as a newcomer would.

- `dev_env`: an environment of its own for one run: a state directory under the
  test's temp dir, free ports for Kafka, its controller, PostgreSQL and the six
  services (CARGOTRACK_DEV_PORT_BASE), nothing inherited that would point it at
  another suite's servers.
- `DevRun`: the CLI started headless, its output read line by line; wait for a
  line matching a condition, list the process tree, stop it with SIGINT.
- `summary_fields`: the `key=value` fields of a headless summary line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from devtools.devstack.ports import free_port_range, free_ports

CARGOTRACK = Path(sys.executable).parent / "cargotrack"
SUMMARY = re.compile(r"^\[dev \+(\d+)s\] shipments=")


def dev_env(state_dir: Path) -> dict[str, str]:
    """The environment of one `cargotrack dev` run of a test (see the module doc)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CARGOTRACK_") or name == "CARGOTRACK_CACHE_DIR"
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("DATABASE_URL", None)
    kafka, controller, postgres = free_ports(3)
    env.update(
        CARGOTRACK_STATE_DIR=str(state_dir),
        CARGOTRACK_KAFKA_PORT=str(kafka),
        CARGOTRACK_KAFKA_CONTROLLER_PORT=str(controller),
        CARGOTRACK_POSTGRES_PORT=str(postgres),
        CARGOTRACK_DEV_PORT_BASE=str(free_port_range(6, (kafka, controller, postgres))[0]),
        PYTHONUNBUFFERED="1",
    )
    return env


def summary_fields(line: str) -> dict[str, str]:
    """`key=value` fields of a headless summary line (`?` means unknown)."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def as_int(fields: Mapping[str, str], name: str) -> int:
    value = fields.get(name, "?")
    return int(value) if value.isdigit() else -1


def process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        todo.extend(children.get(current, []))
    return tree


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))


class DevRun:
    """`cargotrack dev --headless ...` as a child process of the test."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *args: str) -> None:
        self.env = dict(env)
        self.args = ["dev", "--headless", *args]
        self.lines: list[str] = []
        self.stderr_path = log_dir / f"dev-{os.getpid()}-{id(self)}.stderr"
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()

    async def start(self) -> None:
        with self.stderr_path.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                str(CARGOTRACK),
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.env,
            )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        """What the run printed so far, and the tail of its stderr (for messages)."""
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "\n".join(self.lines[-60:]) + "\n--- stderr ---\n" + stderr[-3000:]

    async def wait_for(
        self, condition: Callable[[str], bool], timeout_s: float, *, start: int = 0
    ) -> str:
        """The first line (old or new, from line index `start` on) for which `condition`
        holds; fails after timeout."""
        checked = start
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for line in self.lines[checked:]:
                        if condition(line):
                            return line
                    checked = len(self.lines)
                    assert self._reader is not None
                    if self._reader.done():
                        raise AssertionError(f"cargotrack dev ended early:\n{self.output()}")
                    self._new_line.clear()
                    await self._new_line.wait()
        except TimeoutError:
            raise AssertionError(
                f"no such line within {timeout_s:.0f}s:\n{self.output()}"
            ) from None

    def position(self, line: str) -> int:
        """The index of the last occurrence of `line` among the lines read so far."""
        return len(self.lines) - 1 - self.lines[::-1].index(line)

    def summaries(self) -> list[dict[str, str]]:
        return [summary_fields(line) for line in self.lines if SUMMARY.match(line)]

    async def interrupt(self, timeout_s: float = 90.0) -> int:
        """SIGINT (what Ctrl-C sends) and wait for the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return await self.wait(timeout_s)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        assert self._reader is not None
        async with asyncio.timeout(timeout_s):
            code = await self.process.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        """Last resort after a failed test: SIGKILL the whole tree (no survivors)."""
        if self.process is None or self.process.returncode is not None:
            return
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.process.wait()
