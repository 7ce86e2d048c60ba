"""The image carries the deployables only: no dev package, no tests, no data.

No Docker here, so the build is computed: the build context is the repository minus
what .dockerignore excludes (Docker's rules: Go filepath.Match patterns with ``**``,
relative to the context root; a pattern matching a folder excludes what is in it;
the last matching pattern decides, ``!`` re-includes), and the image's files are
what the Dockerfile's COPY instructions take from that context.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Packages and folders that must never reach the image.
DEV_ONLY = ("devtools", "tests", "bench", "data", "docs", "scripts", "k8s")


def _patterns() -> list[tuple[re.Pattern[str], bool]]:
    """(regex, excludes) of each .dockerignore line, in order."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((re.compile(_regex(line)), excludes))
    return patterns


def _regex(pattern: str) -> str:
    """Go filepath.Match syntax, plus ``**`` for any number of folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out, i = (
                out + "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]",
                end + 1,
            )
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _excluded(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: a pattern matches the path or one of its parent folders."""
    excluded = False
    for regex, excludes in patterns:
        if any(regex.fullmatch(prefix) for prefix in _prefixes(path)):
            excluded = excludes
    return excluded


def build_context() -> set[str]:
    """The files `docker build .` sends: paths relative to the repository."""
    patterns = _patterns()
    prune = all(excludes for _, excludes in patterns)  # no `!`: an excluded folder stays out
    found: set[str] = set()
    for folder, dirs, files in os.walk(REPO):
        here = Path(folder).relative_to(REPO).as_posix()
        rel = "" if here == "." else f"{here}/"
        if prune:
            dirs[:] = [d for d in dirs if not _excluded(rel + d, patterns)]
        found.update(rel + f for f in files if not _excluded(rel + f, patterns))
    return found


def _prefixes(path: str) -> list[str]:
    parts = PurePosixPath(path).parts
    return ["/".join(parts[: n + 1]) for n in range(len(parts))]


def copied_files(context: set[str]) -> set[str]:
    """The context files the Dockerfile's COPY instructions put into the image: a
    source (a Go filepath.Match pattern) takes the files and folders it matches."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = re.findall(r"^\s*(COPY|ADD)\s+(.+)$", text, re.MULTILINE | re.IGNORECASE)
    assert instructions
    copied: set[str] = set()
    for kind, arguments in instructions:
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue  # from another stage, not from the context
        assert kind.upper() == "COPY", "ADD from the context: this test reads only COPY"
        sources = [word for word in words if not word.startswith("--")][:-1]
        for source in sources:
            source = os.path.normpath(source).lstrip("/")
            if source == ".":
                return set(context)
            regex = re.compile(_regex(source))
            copied |= {p for p in context if any(regex.fullmatch(x) for x in _prefixes(p))}
    return copied


@pytest.fixture(scope="module")
def context() -> set[str]:
    return build_context()


def test_the_dockerignore_reading_follows_dockers_rules() -> None:
    patterns = [(re.compile(_regex(p)), True) for p in ("**/__pycache__", "build", "*.py[cod]")]
    patterns.append((re.compile(_regex("keep.pyc")), False))
    assert _excluded("a/b/__pycache__/x.pyc", patterns)
    assert _excluded("build/lib/x.py", patterns)
    assert _excluded("x.pyo", patterns)
    assert not _excluded("keep.pyc", patterns)
    assert not _excluded("a/x.pyc", patterns)  # `*` does not cross a folder
    assert not _excluded("rebuild/x.py", patterns)


def test_the_build_context_carries_no_dev_package(context: set[str]) -> None:
    assert {"pyproject.toml", "services/cli.py", "shared/config.py"} <= context
    assert any(path.startswith("shared/migrations/") for path in context)
    leaked = sorted(p for p in context if p.split("/", 1)[0] in DEV_ONLY)
    assert leaked == []


def test_the_image_copies_only_the_deployables(context: set[str]) -> None:
    copied = copied_files(context)
    assert {"pyproject.toml", "README.md", "services/cli.py", "services/registry.py"} <= copied
    assert {path.split("/", 1)[0] for path in copied} <= {
        "pyproject.toml",
        "README.md",
        "requirements.lock",
        "shared",
        "services",
    }
    # The packages pip installs there: what pyproject's find includes, of what is copied.
    packages = {path.split("/", 1)[0] for path in copied if path.endswith("/__init__.py")}
    assert packages == {"shared", "services"}


def test_no_deployable_module_reads_the_data_folder(context: set[str]) -> None:
    """data/ (recorded trajectories) is not in the image: only devtools/ reads it
    (`cargotrack simulate`, `eta-eval`), so no copied module names it."""
    naming = {}
    for path in sorted(p for p in copied_files(context) if p.endswith(".py")):
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                value = node.value
                if value in ("data", "trajectories") or re.search(r"(^|[\s./`])data/", value):
                    naming[path] = value[:80]
    assert naming == {}
