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


def _module_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> set[str]:
    """Every module the file imports, absolute: relative imports resolved against the
    file's package, and `from package import name` also counted as `package.name`
    (name may be a module: `from services import dispatch`)."""
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path)[:-1]
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            modules.add(origin)
            modules.update(f"{origin}.{alias.name}" for alias in node.names)
    return {m for m in modules if m}


def _repo_files(module: str) -> list[Path]:
    """The repository files importing `module` runs: its packages' __init__ and itself."""
    parts = module.split(".")
    found = []
    for n in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:n])
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                found.append(candidate)
    return found


def _reachable_imports(path: Path) -> dict[str, list[str]]:
    """Every module imported by the file or, transitively, by the repository modules
    it imports; each with one chain of files that leads to it."""
    chains: dict[str, list[str]] = {}
    queue = [(path, [str(path.relative_to(ROOT))])]
    seen = {path}
    while queue:
        current, chain = queue.pop()
        for module in _imports(current):
            chains.setdefault(module, chain)
            for file in _repo_files(module):
                if file not in seen:
                    seen.add(file)
                    queue.append((file, [*chain, str(file.relative_to(ROOT))]))
    return chains


def _python_files(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "pb" not in p.relative_to(ROOT).parts]


def test_shared_never_imports_services() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "services")
        for p in _python_files("shared")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_domain_logic_imports_no_io_library() -> None:
    """Not directly, nor through another repository module it imports."""
    forbidden = {"aiokafka", "asyncpg", "grpc", "grpc_health", "grpc_reflection"}
    offenders = {
        str(p.relative_to(ROOT)): {
            m: " -> ".join(chain)
            for m, chain in _reachable_imports(p).items()
            if m.split(".")[0] in forbidden
        }
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
