"""py-spy profiles of service processes while the benchmark loads them.

`record` samples one process for a while (py-spy record, raw collapsed stacks, idle
frames dropped) and writes `<prefix>.txt` (the stacks, usable with any flamegraph
tool) and `<prefix>-summary.txt` (where the time goes: by self time per function,
by inclusive time per function, and by top-level area). `python -m bench.profiling
FILE.txt` prints a summary again.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path

#: Frames look like "function (path/to/file.py:123)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def record(pid: int, prefix: Path, duration_s: float, rate: int = 97) -> None:
    """Profile `pid` for `duration_s` seconds into `prefix`.txt and its summary."""
    tool = py_spy()
    if tool is None:
        print("bench: py-spy not found; no profile", file=sys.stderr)
        return
    prefix.parent.mkdir(parents=True, exist_ok=True)
    raw = prefix.with_suffix(".txt")
    process = await asyncio.create_subprocess_exec(
        tool,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(duration_s + 60):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0 or not raw.exists():
        print(f"bench: py-spy failed: {err.decode(errors='replace')[-300:]}", file=sys.stderr)
        return
    summary = summarize(raw.read_text(errors="replace"))
    prefix.with_name(prefix.name + "-summary.txt").write_text(summary)


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarize(collapsed: str, top: int = 30) -> str:
    """Where the samples went, from py-spy's raw (collapsed) output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        areas[_area(frames)] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples (active threads only)", "", "by area:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in areas.most_common()]
    out += ["", "by self time:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in self_time.most_common(top)]
    out += ["", "by inclusive time:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


#: (substring of a frame, area) in priority order: the first frame (from the leaf up)
#: that matches names the area a sample is charged to.
_AREAS = (
    ("copy_records_to_table", "PostgreSQL COPY (asyncpg)"),
    ("executemany", "PostgreSQL executemany (asyncpg)"),
    ("(asyncpg/", "PostgreSQL other (asyncpg)"),
    ("statecodec", "state JSON codec"),
    ("json/", "json"),
    ("shared/domain/eta", "ETA model"),
    ("shared/domain/geo", "geometry"),
    ("shapely", "geometry"),
    ("shared/domain/validation", "validation"),
    ("shared/domain/tracking", "tracking fold"),
    ("live.py", "live tracking (other)"),
    ("shared/envelopes", "envelope encode/decode"),
    ("(aiokafka/", "Kafka client (aiokafka)"),
    ("(grpc/", "gRPC (grpcio)"),
    ("auth.py", "auth"),
    ("asyncio/", "event loop"),
)


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for marker, area in _AREAS:
            if marker in frame:
                return area
    return "other: " + frames[-1]


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"== {name}")
        print(summarize(Path(name).read_text(errors="replace")))
