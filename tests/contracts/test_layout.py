"""docs/architecture.md's layout table matches the tree: every path it names exists,
and every top-level folder of the repository has a row."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layout_paths() -> list[str]:
    """The paths of the first column of the table under `## Layout`. A bare name
    (`supervisor.py`) is in the folder of the path before it in the same cell;
    `<name>` stands for any one folder."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Layout") :]
    section = section[: section.index("\n## ", 1)]
    paths = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            path = name if "/" in name.rstrip("/") or not folder else folder + name
            folder = path[: path.rstrip("/").rfind("/") + 1]
            paths.append(path)
    return paths


def test_every_path_in_the_layout_table_exists() -> None:
    paths = layout_paths()
    assert "services/cli.py" in paths
    assert "devtools/supervisor.py" in paths  # a bare name after a path
    missing = [p for p in paths if not list(ROOT.glob(re.sub(r"<[a-z]+>", "*", p).rstrip("/")))]
    assert missing == []


def test_every_top_level_folder_has_a_row() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    folders = {path.split("/", 1)[0] for path in tracked if "/" in path}
    folders = {f for f in folders if not f.startswith(".")}
    named = {path.split("/", 1)[0] for path in layout_paths()}
    assert sorted(folders - named) == []
