"""The README's commands, run against a running `cargotrack dev`, so they cannot rot.

Every ```sh block preceded by a `<!-- readme-test: ... -->` marker is run, in README
order and in one bash process (later blocks use the variables of earlier ones),
from the repository's root. The marker states what the block must do:

    <!-- readme-test: [exit=N] [expect=TEXT] -->

`exit` is the block's exit status (default 0: the status of its last command,
pipefail on); `expect` is text its output must contain (the rest of the marker).

The suite runs on ports of its own (tests/dev_helpers.py): the README's addresses
(the `cargotrack dev` defaults) are rewritten to the test's ports, and nothing else.
grpcurl (`make tools`) and kcat (`make tools`, or the system's package manager) must
be installed: a missing tool fails the test with the command that installs it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.devstack.ports import DEFAULT_KAFKA_PORT
from devtools.launcher import dev_service_ports
from services.http_gateway.links import dev_http_port
from services.registry import SERVICES
from tests.dev_helpers import SUMMARY, DevRun, as_int, dev_env, summary_fields

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test:(?P<options>.*?)-->\s*$")
END_OF_BLOCK = "::readme-test block {index} exit="


@dataclass(frozen=True)
class Block:
    index: int
    line: int
    code: str
    exit: int
    expect: str


def readme_blocks(text: str) -> list[Block]:
    """The marked ```sh blocks of the README, in order (see the module docstring)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    for number, line in enumerate(lines):
        marker = MARKER.match(line)
        if marker is None:
            continue
        options = marker["options"].strip()
        exit_code = 0
        if found := re.match(r"exit=(\d+)\s*", options):
            exit_code = int(found[1])
            options = options[found.end() :]
        expect = options.removeprefix("expect=").strip() if options.startswith("expect=") else ""
        assert not options or expect, f"README.md:{number + 1}: cannot read marker {line!r}"
        start = number + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        assert lines[start].strip() == "```sh", f"README.md:{number + 1}: no ```sh block follows"
        end = lines.index("```", start + 1)
        code = "\n".join(lines[start + 1 : end])
        blocks.append(Block(len(blocks), number + 1, code, exit_code, expect))
    return blocks


def addresses(env: dict[str, str]) -> dict[str, str]:
    """README address → the test suite's address, for every service and Kafka."""
    ports = dev_service_ports(env)
    moved = {
        f"127.0.0.1:{spec.default_port}": f"127.0.0.1:{ports[name]}"
        for name, spec in SERVICES.items()
    }
    moved[f"127.0.0.1:{DEFAULT_KAFKA_PORT}"] = f"127.0.0.1:{env['CARGOTRACK_KAFKA_PORT']}"
    defaults = {name: spec.default_port for name, spec in SERVICES.items()}
    moved[f"127.0.0.1:{dev_http_port(defaults)}"] = f"127.0.0.1:{dev_http_port(ports)}"
    return moved


def script(blocks: list[Block], moved: dict[str, str]) -> str:
    parts = ["set -u -o pipefail", f"cd {ROOT}"]
    for block in blocks:
        code = re.sub(r"127\.0\.0\.1:\d+", lambda m: moved.get(m[0], m[0]), block.code)
        parts += [code, f'echo "{END_OF_BLOCK.format(index=block.index)}$?::"']
    return "\n".join(parts) + "\n"


def test_the_readme_shows_the_portal_dispatch_and_kafka_calls() -> None:
    blocks = readme_blocks(README.read_text())
    code = "\n".join(b.code for b in blocks)
    for needed in (
        "cargotrack token --role customer",
        "cargotrack token --role dispatcher",
        "cargotrack.v1.TrackingService/GetShipment",
        "cargotrack.v1.DispatchService/SubscribeDelays",
        "kcat -b 127.0.0.1:19092",
        "curl",
        "/v1/track/",
        "/v1/alerts:subscribe",
    ):
        assert needed in code
    assert all(b.expect for b in blocks[1:])
    # Every address in the blocks is one the test can move to its own suite.
    moved = addresses(dev_env(Path("/nonexistent")))
    for address in re.findall(r"127\.0\.0\.1:\d+", code):
        assert address in moved, f"{address} is not a cargotrack dev default"


def _tool_or_fail(name: str, install: str) -> None:
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed; install it with: {install}", pytrace=False)


@pytest.fixture
async def suite(tmp_path: Path, state_dir: Path) -> AsyncIterator[tuple[DevRun, dict[str, str]]]:
    env = dev_env(state_dir)
    run = DevRun(env, tmp_path, "--status-every", "2")
    await run.start()
    try:
        yield run, env
    finally:
        await run.kill()


# Above the sum of the waits inside (150 + 60 + 90 + 90 s): a slow step fails with
# its own message and the output so far, not with pytest-timeout's stack dump.
@pytest.mark.timeout(420)
async def test_the_readme_commands_work_against_a_running_suite(
    suite: tuple[DevRun, dict[str, str]],
) -> None:
    run, env = suite
    cache = Path(env.get("CARGOTRACK_CACHE_DIR") or Path.home() / ".cache/cargotrack")
    tools = cache / "tools" / "bin"
    env["PATH"] = f"{tools}:{env.get('PATH', '')}"
    if not (tools / "grpcurl").exists():
        _tool_or_fail("grpcurl", "make tools")
    _tool_or_fail("kcat", "make tools (Debian, as root), apt-get install kcat, brew install kcat")

    await run.wait_for(lambda line: line.startswith("ready;"), 150)

    def ready_for_the_readme(line: str) -> bool:
        fields = summary_fields(line) if SUMMARY.match(line) else {}
        return as_int(fields, "LATE") >= 1 and as_int(fields, "in_transit") >= 1

    await run.wait_for(ready_for_the_readme, 60)

    blocks = readme_blocks(README.read_text())
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script(blocks, addresses(env)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    async with asyncio.timeout(90):
        raw, _ = await shell.communicate()
    output = raw.decode(errors="replace")
    rest = output
    for block in blocks:
        end = END_OF_BLOCK.format(index=block.index)
        assert end in rest, f"README.md:{block.line}: block did not finish:\n{rest[-3000:]}"
        own, rest = rest.split(end, 1)
        status, rest = rest.split("::", 1)
        where = f"README.md:{block.line}"
        assert int(status) == block.exit, f"{where}: exit {status}, wanted {block.exit}:\n{own}"
        assert block.expect in own, f"{where}: no {block.expect!r} in:\n{own[-3000:]}"

    assert await run.interrupt() == 0, run.output()
