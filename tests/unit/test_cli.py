"""The `cargotrack` command keeps every subcommand, with or without the dev package.

The development commands come from devtools/ through entry points (pyproject.toml);
the container image does not carry that package (tests/contracts/test_image.py), and
there they must say, in one line, which install they need.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import DEV_INSTALL, build_parser

DEV_COMMANDS = ("dev", "simulate", "eta-eval")

#: `cargotrack` as the image runs it: the devtools package cannot be imported.
WITHOUT_DEVTOOLS = (
    "import sys; sys.modules['devtools'] = None; from services.cli import main; main()"
)


def _without_devtools(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DEVTOOLS, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_dev_install_has_every_subcommand() -> None:
    commands = _subcommands(build_parser())
    assert set(DEV_COMMANDS) <= set(commands)
    assert {"serve", "migrate", "create-topics", "token", "rebuild", "env", "eta-report"} <= set(
        commands
    )
    options = {o for action in commands["dev"]._actions for o in action.option_strings}
    assert {"--headless", "--no-simulator", "--give-up-after"} <= options


def test_without_devtools_every_subcommand_is_still_listed() -> None:
    result = _without_devtools("--help")
    assert result.returncode == 0, result.stderr
    for name in [*DEV_COMMANDS, *_subcommands(build_parser())]:
        assert name in result.stdout
    assert "(needs the development install)" in result.stdout


@pytest.mark.parametrize(
    "argv", [["dev", "--headless"], ["simulate", "--vehicles", "2"], ["eta-eval", "--json"]]
)
def test_without_devtools_a_dev_command_names_the_install_in_one_line(argv: list[str]) -> None:
    result = _without_devtools(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cargotrack: `cargotrack {argv[0]}` is a development command")
    assert lines[0].endswith(DEV_INSTALL)
    assert "pip install -e '.[dev,local]'" in DEV_INSTALL


def test_without_devtools_operator_commands_still_run(tmp_path: Path) -> None:
    result = _without_devtools("serve", "no-such-service")
    assert result.returncode == 2
    assert "invalid choice: 'no-such-service'" in result.stderr
    result = _without_devtools("token", "--role", "ops", cwd=tmp_path)  # no dev stack there
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2  # a JWT: header.payload.signature


def test_dev_commands_turn_expected_failures_into_one_line_usage_errors() -> None:
    from devtools.commands import _one_line_errors
    from devtools.devstack import DevStackError
    from services.cli import UsageError

    def port_taken(_args: argparse.Namespace) -> None:
        raise DevStackError("port 9092 is taken\nby pid 42")

    def no_rich(_args: argparse.Namespace) -> None:
        raise ModuleNotFoundError("No module named 'rich'", name="rich")

    def bug(_args: argparse.Namespace) -> None:
        raise ModuleNotFoundError("No module named 'devtools.nope'", name="devtools.nope")

    with pytest.raises(UsageError, match=r"^port 9092 is taken \| by pid 42$"):
        _one_line_errors(port_taken)(argparse.Namespace())
    with pytest.raises(UsageError) as missing:
        _one_line_errors(no_rich)(argparse.Namespace())
    assert str(missing.value) == f"rich is not installed; {DEV_INSTALL}"
    with pytest.raises(ModuleNotFoundError):  # the project's own: a bug, kept as it is
        _one_line_errors(bug)(argparse.Namespace())


@pytest.mark.parametrize("name", ["projector", "learner", "webhooks", "dispatch"])
def test_several_processes_are_refused_where_they_are_unsafe(name: str) -> None:
    """Before anything starts, in one line naming the setting and the services allowed."""
    result = subprocess.run(
        [sys.executable, "-m", "services", "serve", name],
        env={
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "DATABASE_URL": "postgresql://cargotrack@127.0.0.1:1/cargotrack",
            "CARGOTRACK_DEV_MODE": "1",
            "CARGOTRACK_PROCESSES": "2",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"cargotrack: CARGOTRACK_PROCESSES=2: {name} runs as one process (only gps-ingest and"
        " tracking-query run several behind one port); scale it with replicas, and set"
        " CARGOTRACK_PROCESSES on those Deployments only"
    ]
