"""The breaking-change check (scripts/check-breaking): it runs, it catches, it never passes blind.

The real check runs on this repository (and in `make lint`). The others run the same
script inside a throwaway git repository holding a copy of protos/, so the breaking
edits never touch the real contracts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.contracts.test_protos import ROOT, _tool

SCRIPT = ROOT / "scripts" / "check-breaking"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def _run(script_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV}
    env.pop("CARGOTRACK_BUF_AGAINST", None)
    return subprocess.run(
        [sys.executable, str(script_root / "scripts" / "check-breaking"), *args],
        cwd=script_root,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ENV}
    )


def _commit_all(repo: Path, message: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository (branch main) with a copy of protos/ and the script, one commit."""
    _tool("buf", "run `make tools` (npm @bufbuild/buf)")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy(SCRIPT, repo / "scripts" / "check-breaking")
    _git(repo, "init", "-q", "-b", "main")
    _commit_all(repo, "contracts")
    return repo


def test_this_repository_is_compatible_with_its_reference() -> None:
    result = _run(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compatible with" in result.stdout


def _edit(repo: Path, proto: str, old: str, new: str) -> None:
    path = repo / "protos" / "cargotrack" / "v1" / proto
    text = path.read_text()
    assert old in text, f"{old!r} not in {proto}: update this test"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("proto", "old", "new", "complaint"),
    [
        pytest.param(
            "shipment.proto",
            "string customer_id = 1;",
            "string customer_id = 9;",
            'Previously present field "1" with name "customer_id"',
            id="renumbered-field",
        ),
        pytest.param(
            "common.proto",
            "double latitude = 1;",
            "string latitude = 1;",
            'changed type from "double" to "string"',
            id="incompatible-type",
        ),
        pytest.param(
            "shipment.proto",
            "string customer_id = 1;",
            "string customer = 1;",
            'changed name from "customer_id" to "customer"',
            id="json-name-change",
        ),
    ],
)
def test_a_breaking_commit_fails_the_check(
    repo: Path, proto: str, old: str, new: str, complaint: str
) -> None:
    _edit(repo, proto, old, new)
    _commit_all(repo, "break the contract")  # on main, so the reference is HEAD^1
    result = _run(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert complaint in result.stderr
    assert "HEAD's first parent" in result.stderr


def test_an_uncommitted_breaking_edit_on_a_branch_fails_against_the_merge_base(
    repo: Path,
) -> None:
    _git(repo, "checkout", "-q", "-b", "feature")
    (repo / "notes.txt").write_text("a commit on the branch\n")
    _commit_all(repo, "branch work")
    _edit(repo, "shipment.proto", "string customer_id = 1;", "int64 customer_id = 1;")
    result = _run(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "merge base with main" in result.stderr


def test_a_compatible_addition_passes(repo: Path) -> None:
    _edit(
        repo,
        "shipment.proto",
        "string reference = 6;",
        "string reference = 6;\n  string note = 99;",
    )
    _commit_all(repo, "add a field")
    result = _run(repo)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_first_commit_cannot_be_checked_and_fails(repo: Path) -> None:
    result = _run(repo)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAILED, cannot compare: HEAD is the first commit" in result.stderr


def test_a_shallow_clone_cannot_be_checked_and_fails(repo: Path, tmp_path: Path) -> None:
    (repo / "notes.txt").write_text("second commit\n")
    _commit_all(repo, "second")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(clone))
    result = _run(clone)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "shallow clone" in result.stderr


def test_a_missing_reference_fails(repo: Path) -> None:
    result = _run(repo, "--against", "v9.9.9")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'v9.9.9' does not name a commit" in result.stderr


def test_a_release_tag_is_the_reference_once_there_is_one(repo: Path) -> None:
    _git(repo, "tag", "v0.1.0")
    _edit(repo, "common.proto", "double latitude = 1;", "float latitude = 1;")
    _commit_all(repo, "narrow latitude")
    (repo / "notes.txt").write_text("a later commit\n")
    _commit_all(repo, "later")  # HEAD^1 already has the break: only the tag catches it
    result = _run(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "release tag v0.1.0" in result.stderr
