"""`python -m bench.run --profile` refuses to start without py-spy instead of skipping it."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.profiling
import bench.run


def test_profile_without_py_spy_fails_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.run, "py_spy", lambda: None)
    with pytest.raises(SystemExit) as exited:
        bench.run.main(["--profile", str(tmp_path / "prof")])
    assert exited.value.code == 2
    assert "--profile needs py-spy, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "prof").exists()


def test_py_spy_comes_with_the_dev_extra() -> None:
    """`make bootstrap` installs it (pyproject.toml, dev extra), so --profile works."""
    assert bench.profiling.py_spy() is not None
