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


#: Where the project's Python lives; every file under them is checked below.
PACKAGES = ("shared", "services", "devtools", "bench", "tests", "protos")
#: Not the project's own code: generated (shared/pb) or tool state.
SKIPPED_PARTS = {"pb", "__pycache__", "node_modules", ".venv", "build"}


def _project_files() -> list[Path]:
    """Every Python file of the project: folders and top-level files alike."""
    found = [
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if not SKIPPED_PARTS.intersection(path.relative_to(ROOT).parts)
    ]
    strays = [
        str(path.relative_to(ROOT))
        for path in ROOT.glob("*.py")
        if path.is_file() and not path.name.startswith(".")
    ]
    assert strays == [], f"Python files outside {PACKAGES}: give them a package"
    return sorted(found)


def _module_name(path: Path) -> str:
    return ".".join(_module_of(path))


def _project_module(module: str) -> str | None:
    """The project module (a file) that an imported name is, or None (third-party,
    the standard library, generated code, or a name inside a module)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES or SKIPPED_PARTS.intersection(parts):
        return None
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file() or base.with_suffix(".py").is_file():
        return module
    return None


def _project_imports(path: Path) -> set[str]:
    """The project modules the file imports, at module level or inside functions."""
    own = _module_name(path)
    return {m for m in map(_project_module, _imports(path)) if m and m != own}


#: Layer of a file (the longest matching prefix) -> the layers it may import from.
#: Deployables (shared, services) never import the dev package, the benchmark or the
#: tests; the dev package never imports the benchmark or the tests; the benchmark
#: shares helpers with the tests one way only: tests import bench, never the reverse.
#: The domain imports, of the project, only itself and the generated messages: none
#: of the modules that do I/O (shared.db, shared.kafka, shared.readmodel, ...).
LAYERS: dict[str, set[str]] = {
    "shared.domain": {"shared.domain", "shared.pb"},
    "shared": {"shared"},
    "services": {"services", "shared"},
    "devtools": {"devtools", "services", "shared"},
    "bench": {"bench", "devtools", "services", "shared"},
    "tests": {"tests", "bench", "devtools", "services", "shared"},
    "protos": {"protos"},
}


def _layer(module: str) -> str:
    matches = [layer for layer in LAYERS if module == layer or module.startswith(f"{layer}.")]
    assert matches, f"{module}: in no layer of LAYERS (tests/contracts/test_protos.py)"
    return max(matches, key=len)


def test_every_file_is_in_a_layer_and_imports_only_what_its_layer_may() -> None:
    files = _project_files()
    top_level = {f"{p}/{f.name}" for p in ("services", "shared") for f in (ROOT / p).glob("*.py")}
    assert top_level <= {str(f.relative_to(ROOT)) for f in files}  # not only subfolders
    offenders = {}
    for path in files:
        allowed = LAYERS[_layer(_module_name(path))]
        bad = sorted(
            module
            for module in _project_imports(path)
            if not any(module == a or module.startswith(f"{a}.") for a in allowed)
        )
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_import_rules_see_an_offender() -> None:
    """The rule above reads relative, aliased and function-level imports."""
    assert _layer("shared.domain.eta") == "shared.domain"
    assert _layer("services.cli") == "services"
    assert _project_module("shared.domain.eta.EtaModel") is None
    assert _project_module("devtools.launcher") == "devtools.launcher"
    assert "devtools.launcher" not in LAYERS["services"]
    imports = _project_imports(ROOT / "devtools" / "commands.py")
    assert {"services.cli", "devtools.launcher"} <= imports  # the latter inside a function


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(path): _project_imports(path) for path in _project_files()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_among_project_modules() -> None:
    """Counting imports inside functions too: a lazy import only hides a circle."""
    graph = _import_graph()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles(graph) == []


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
    """Every file of services/: a service's package imports no other service and no
    top-level module of services/; registry.py imports no service; cli.py (the
    console script) may import the services it dispatches to."""
    offenders = {}
    for path in _python_files("services"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mine = f"services.{parts[1]}"
        imported = {m for m in _project_imports(path) if m.startswith("services.")}
        if len(parts) > 2 and parts[1] != "__init__":  # a service's package
            others = {m for m in imported if m != mine and not m.startswith(f"{mine}.")}
        elif mine == "services.registry":
            others = imported
        else:
            others = set()
        if others:
            offenders[str(path.relative_to(ROOT))] = sorted(others)
    assert offenders == {}
