"""The running-stack file `cargotrack dev` writes for operator commands beside it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from shared.running_stack import (
    RUNNING_STACK_FILE,
    read_running_stack,
    redact_url,
    remove_running_stack,
    stack_environment,
    write_running_stack,
)

SETTINGS = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:15432/postgres",
    "CARGOTRACK_JWT_SECRET": "it's a secret",
}


def test_written_private_read_back_and_removed(tmp_path: Path) -> None:
    path = write_running_stack(tmp_path, SETTINGS)
    assert path == tmp_path / RUNNING_STACK_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stack = read_running_stack(tmp_path)
    assert stack is not None
    assert stack.pid == os.getpid()
    assert stack.env == SETTINGS
    assert "export CARGOTRACK_JWT_SECRET='it'\"'\"'s a secret'" in stack.export_lines()
    assert [p.name for p in tmp_path.iterdir()] == [RUNNING_STACK_FILE]  # no leftovers
    remove_running_stack(tmp_path)
    remove_running_stack(tmp_path)  # idempotent
    assert read_running_stack(tmp_path) is None


def test_a_file_left_by_a_dead_run_is_stale(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    write_running_stack(tmp_path, SETTINGS, pid=int(finished.stdout))
    assert read_running_stack(tmp_path) is None
    (tmp_path / RUNNING_STACK_FILE).write_text("{not json")
    assert read_running_stack(tmp_path) is None


def test_the_environment_wins_and_the_rest_comes_from_the_stack(tmp_path: Path) -> None:
    assert stack_environment({"PATH": "/bin"}, tmp_path) == ({"PATH": "/bin"}, None, [])
    write_running_stack(tmp_path, SETTINGS)
    mine = {"PATH": "/bin", "DATABASE_URL": "postgresql://me@db/x", "CARGOTRACK_JWT_SECRET": ""}
    environ, stack, taken = stack_environment(mine, tmp_path)
    assert stack is not None
    assert sorted(taken) == ["CARGOTRACK_JWT_SECRET", "KAFKA_BOOTSTRAP_SERVERS"]
    assert environ == {
        "PATH": "/bin",
        "DATABASE_URL": "postgresql://me@db/x",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19092",
        "CARGOTRACK_JWT_SECRET": "it's a secret",
    }


def test_passwords_are_not_printed() -> None:
    assert redact_url("postgresql://u:hunter2@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact_url("postgresql://u@db/x") == "postgresql://u@db/x"
