"""The contracts: generated code is current, buf lint is clean, imports run one way."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str, install_hint: str) -> str:
    tools = (
        Path(os.environ.get("CARGOTRACK_CACHE_DIR", Path.home() / ".cache/cargotrack")) / "tools"
    )
    for candidate in (tools / "node_modules/.bin" / name, tools / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install_hint}")
    return found


def test_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_is_clean() -> None:
    buf = _tool("buf", "run `make tools` (npm @bufbuild/buf)")
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _python_files(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "pb" not in p.relative_to(ROOT).parts]


def test_shared_never_imports_services() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "services")
        for p in _python_files("shared")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_domain_logic_imports_no_io_library() -> None:
    forbidden = {"aiokafka", "asyncpg", "grpc", "grpc_health", "grpc_reflection"}
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] in forbidden)
        for p in _python_files("shared/domain")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_services_never_import_each_other() -> None:
    offenders = {}
    for folder in (ROOT / "services").iterdir():
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for path in folder.rglob("*.py"):
            others = {
                m
                for m in _imports(path)
                if m.startswith("services.") and m.split(".")[1] != folder.name
            }
            if others:
                offenders[str(path.relative_to(ROOT))] = sorted(others)
    assert offenders == {}
