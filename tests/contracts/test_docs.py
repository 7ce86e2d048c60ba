"""The docs tell the truth about names: settings, metrics, commands and tests.

Every check reads its facts at test time, from the sources and not from a list kept
here: the variables `load_settings` reads (and those read anywhere else), the
Prometheus metrics the code defines, the `cargotrack` argument parser, the test files
and functions. So a setting, metric or subcommand added later is held to the same
rules, and a failure says which file to fix and which name is wrong.

The docs are README.md, docs/*.md and k8s/README.md; the Kubernetes configuration is
every file under k8s/. No I/O beyond reading files of the repository.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import eta_eval
from services.cli import build_parser
from shared import eta_report
from shared.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
K8S = ROOT / "k8s"
ENV_FILE = K8S / "base" / "config" / "cargotrack.env"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), K8S / "README.md"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    yield from enumerate(path.read_text().splitlines(), start=1)


def python_files(*folders: str) -> list[Path]:
    return sorted(
        path
        for folder in folders
        for path in (ROOT / folder).rglob("*.py")
        if "pb" not in path.relative_to(ROOT).parts
    )


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def string_constants(path: Path) -> Iterator[str]:
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def report(problems: list[str], what: str) -> None:
    """Fail with one line per problem, each naming the file and the name to fix."""
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(problems), pytrace=False)


def markdown_table(path: Path, heading: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the body rows of the tables under `heading`.

    The section runs to the next heading, whatever its level.
    """
    rows: list[tuple[int, list[str]]] = []
    inside = False
    for number, line in numbered_lines(path):
        if line.startswith("#"):
            if line.strip() == heading:
                inside = True
                continue
            if inside:
                break
        if inside and line.startswith("|") and not re.match(r"^\|[-| :]+\|$", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows.append((number, cells))
    if not rows:
        pytest.fail(f"{rel(path)}: no table under {heading!r}", pytrace=False)
    return rows[1:]  # the first row is the header


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# --- settings -------------------------------------------------------------------------

#: What an environment variable of cargotrack looks like in prose and in config files.
SETTING_NAME = re.compile(r"\b(?:CARGOTRACK|KAFKA)_[A-Z0-9_]*[A-Z0-9]\b|\bDATABASE_URL\b")
CARGOTRACK_NAME = re.compile(r"\bCARGOTRACK_[A-Z0-9_]*[A-Z0-9]\b")
SETTINGS_HEADING = "## Settings"
SECRETS_HEADING = "### Secrets"


class _RecordingEnviron(Mapping[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.looked_up: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.looked_up.add(name)
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.looked_up.add(name)
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@functools.cache
def service_settings() -> set[str]:
    """The variables of the services: what `load_settings` reads, in any configuration.

    A run of `load_settings` on a recording environment finds every name it reads,
    wherever the reading code lives; the names written out in shared/config.py add
    those read only in some configurations.
    """
    environ = _RecordingEnviron(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
            "DATABASE_URL": "postgresql://cargotrack@127.0.0.1/cargotrack",
            "CARGOTRACK_DEV_MODE": "1",
        }
    )
    with contextlib.suppress(ConfigError):  # the names were still read
        load_settings(environ)
    literal = {
        name
        for name in string_constants(ROOT / "shared" / "config.py")
        if SETTING_NAME.fullmatch(name)
    }
    return {name for name in environ.looked_up | literal if SETTING_NAME.fullmatch(name)}


@functools.cache
def variables_read_elsewhere() -> dict[str, str]:
    """CARGOTRACK_* variables of the local stack, the tools and the test suites.

    Name -> a file that names it. Found as whole string literals in the code (not in
    test files, which may name variables that do not exist on purpose) and in the
    Makefile and scripts/.
    """
    found: dict[str, str] = {}
    for path in python_files("shared", "services", "devtools", "bench", "tests"):
        if path.name.startswith("test_"):
            continue
        for value in string_constants(path):
            if CARGOTRACK_NAME.fullmatch(value):
                found.setdefault(value, rel(path))
    for path in [ROOT / "Makefile", *sorted((ROOT / "scripts").iterdir())]:
        if path.is_file():
            for name in CARGOTRACK_NAME.findall(path.read_text(errors="replace")):
                found.setdefault(name, rel(path))
    return found


def k8s_files() -> list[Path]:
    return sorted(
        path for path in K8S.rglob("*") if path.is_file() and path.suffix in (".yaml", ".env")
    )


def settings_table() -> dict[str, int]:
    """Variable -> line of its row in the settings table of docs/operations.md."""
    table: dict[str, int] = {}
    for number, cells in markdown_table(OPERATIONS, SETTINGS_HEADING):
        for name in backticked(cells[0]):
            table[name] = number
    return table


def k8s_variables() -> set[str]:
    """Variables the Kubernetes configuration sets for the pods.

    Keys of cargotrack.env and of the overlays' generated ConfigMaps and Secrets,
    `env` entries of the manifests, and the variables the secrets table of
    docs/operations.md says come from a Secret the manifests reference.
    """
    names = {
        line.split("=", 1)[0].strip()
        for line in ENV_FILE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    manifests = "\n".join(path.read_text() for path in k8s_files())
    names |= set(re.findall(r"^\s*- ([A-Z][A-Z0-9_]*)=", manifests, re.MULTILINE))
    names |= set(re.findall(r"^\s*- name: ([A-Z][A-Z0-9_]*)\s*$", manifests, re.MULTILINE))
    for _, cells in markdown_table(OPERATIONS, SECRETS_HEADING):
        secret = re.search(r"Secret `([a-z0-9-]+)`", cells[1])
        if secret and re.search(rf"\b{re.escape(secret.group(1))}\b", manifests):
            names |= set(backticked(cells[0]))
    return names


def test_every_variable_named_in_the_docs_and_k8s_is_read_by_the_code() -> None:
    known = service_settings() | set(variables_read_elsewhere())
    problems = []
    for path in [*doc_files(), *k8s_files()]:
        for number, line in numbered_lines(path):
            for name in SETTING_NAME.findall(line):
                if name not in known:
                    problems.append(
                        f"{rel(path)}:{number}: {name} is read nowhere in the code"
                        " (shared/config.py, shared/, services/, devtools/, bench/, tests/,"
                        " Makefile): correct the name, or remove it"
                    )
    report(problems, "variables named in the docs or k8s/ that the code does not read")


def test_every_setting_is_in_the_settings_table_of_operations_md() -> None:
    table = settings_table()
    operations = OPERATIONS.read_text()
    problems = [
        f"docs/operations.md: {name} (read by load_settings, shared/config.py) has no row in"
        f" the table under {SETTINGS_HEADING!r}: add one"
        for name in sorted(service_settings() - set(table))
    ]
    problems += [
        f"docs/operations.md: {name} (read in {where}) is not documented: add it to the"
        f" tables under {SETTINGS_HEADING!r}"
        for name, where in sorted(variables_read_elsewhere().items())
        if name not in table and name not in operations
    ]
    report(problems, "settings missing from docs/operations.md")


def test_every_setting_is_in_the_k8s_config() -> None:
    in_k8s = k8s_variables()
    problems = [
        f"k8s/base/config/cargotrack.env: {name} (read by load_settings) is missing: add"
        f" `{name}=<value>` (empty for unset), or set it in a manifest's env or a Secret"
        " listed in the secrets table of docs/operations.md"
        for name in sorted(service_settings() - in_k8s)
    ]
    report(problems, "settings missing from the Kubernetes configuration")


# --- metrics --------------------------------------------------------------------------

METRIC_KINDS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    "Enum": "enum",
}
DOC_METRIC = re.compile(r"\bcargotrack_[a-z0-9_]*[a-z0-9]\b")
# PostgreSQL roles share the prefix: the managed roles of the CloudNativePG cluster.
DATABASE_ROLES = frozenset(
    re.findall(
        r"^\s*- name: (cargotrack_\w+)\s*$",
        (ROOT / "k8s" / "base" / "postgres" / "cluster.yaml").read_text(),
        re.MULTILINE,
    )
)
METRICS_HEADING = "### Metrics"


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: counters end in _total, infos in _info
    kind: str
    labels: tuple[str, ...]
    defined_in: str


def _literal_strings(node: ast.expr | None, constants: Mapping[str, ast.expr]) -> list[str]:
    if isinstance(node, ast.Name) and node.id in constants:
        node = constants[node.id]
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    raise ValueError(ast.unparse(node) if node is not None else "?")


@functools.cache
def exported_metrics() -> dict[str, Metric]:
    """Every `cargotrack_*` metric defined with prometheus_client in shared/, services/, devtools/.

    Read from the source (constructor calls with a literal name), so modules that are
    expensive or optional to import count too.
    """
    metrics: dict[str, Metric] = {}
    for path in python_files("shared", "services", "devtools"):
        tree = parse(path)
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
            for alias in node.names
        }
        constants = {
            target.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        assigned_to = {id(value): name for name, value in constants.items()}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            kind = func.id if isinstance(func, ast.Name) and func.id in imported else None
            if isinstance(func, ast.Attribute) and ast.unparse(func.value) == "prometheus_client":
                kind = func.attr
            first = node.args[0]
            if kind not in METRIC_KINDS or not (
                isinstance(first, ast.Constant) and isinstance(first.value, str)
            ):
                continue
            labels_node = next((k.value for k in node.keywords if k.arg == "labelnames"), None)
            if labels_node is None and len(node.args) > 2:
                labels_node = node.args[2]
            where = f"{rel(path)}:{node.lineno}"
            try:
                labels = _literal_strings(labels_node, constants) if labels_node else []
            except ValueError as error:
                pytest.fail(
                    f"{where}: the labels of {first.value} ({error}) are not a literal list:"
                    " write them out so tests/contracts/test_docs.py can check the docs",
                    pytrace=False,
                )
            name = first.value
            if kind == "Counter":
                name = name.removesuffix("_total") + "_total"
            elif kind == "Info":
                name = f"{name}_info"
                labels = _info_labels(tree, assigned_to.get(id(node)))
            metric = Metric(name, METRIC_KINDS[kind], tuple(labels), where)
            metrics[name] = metric
    return metrics


def _info_labels(tree: ast.Module, variable: str | None) -> list[str]:
    """The keys of the literal dicts passed to `variable.info(...)` in the same module."""
    labels: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "info"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == variable
            and node.args
            and isinstance(node.args[0], ast.Dict)
        ):
            labels |= {
                key.value
                for key in node.args[0].keys
                if isinstance(key, ast.Constant) and isinstance(key.value, str)
            }
    return sorted(labels)


def _series_base(name: str, metrics: Mapping[str, Metric]) -> str:
    """The metric a series name of a doc belongs to (histogram _bucket/_sum/_count)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in metrics and metrics[base].kind in ("histogram", "summary"):
            return base
    return name


def metrics_table() -> dict[str, tuple[int, str, list[str]]]:
    """Series -> (line, type, label names) of the metrics table of docs/operations.md."""
    table: dict[str, tuple[int, str, list[str]]] = {}
    for number, cells in markdown_table(OPERATIONS, METRICS_HEADING):
        names = [n for n in backticked(cells[0]) if n.startswith("cargotrack_")]
        for name in names:
            labels = [] if cells[2] in ("–", "-", "") else backticked(cells[2])
            table[name] = (number, cells[1], labels)
    return table


def test_the_metrics_scanner_finds_what_prometheus_registers() -> None:
    """Keeps the source scan below honest: it sees every metric of shared.metrics."""
    from prometheus_client import REGISTRY

    import shared.metrics  # noqa: F401  (registers its metrics)

    registered = {
        family.name for family in REGISTRY.collect() if family.name.startswith("cargotrack_")
    }
    scanned = {
        metric.name.removesuffix("_total").removesuffix("_info")
        for metric in exported_metrics().values()
    }
    assert registered, "shared.metrics registered no cargotrack_ metric"
    assert registered <= scanned, f"the source scan missed {sorted(registered - scanned)}"


def test_every_metric_named_in_the_docs_is_exported() -> None:
    metrics = exported_metrics()
    problems = []
    for path in doc_files():
        for number, line in numbered_lines(path):
            for name in DOC_METRIC.findall(line):
                if name in DATABASE_ROLES:
                    continue
                if _series_base(name, metrics) not in metrics:
                    problems.append(
                        f"{rel(path)}:{number}: {name} is not a metric the code exports"
                        f" (counters end in _total, infos in _info): correct the name"
                    )
    report(problems, "metrics named in the docs that do not exist")


def test_every_exported_metric_is_in_the_metrics_table_with_its_labels() -> None:
    metrics = exported_metrics()
    table = metrics_table()
    problems = []
    for name, metric in sorted(metrics.items()):
        if name not in table:
            problems.append(
                f"docs/operations.md: {name} ({metric.kind}, {metric.defined_in}) has no row"
                f" in the table under {METRICS_HEADING!r}: add one"
            )
            continue
        number, kind, labels = table[name]
        if kind != metric.kind:
            problems.append(
                f"docs/operations.md:{number}: {name} is a {metric.kind}, the table says {kind!r}"
            )
        if sorted(labels) != sorted(metric.labels):
            problems.append(
                f"docs/operations.md:{number}: {name} has labels"
                f" {', '.join(metric.labels) or '(none)'} ({metric.defined_in}),"
                f" the table says {', '.join(labels) or '(none)'}: list exactly the label"
                " names in the labels column (values go in the meaning column)"
            )
    all_labels = {label for metric in metrics.values() for label in metric.labels}
    text = OPERATIONS.read_text()
    start = text.find("Labels are few and bounded:")
    if start < 0:
        problems.append("docs/operations.md: the line 'Labels are few and bounded: ...' is gone")
    else:
        number = text.count("\n", 0, start) + 1
        listed = set(backticked(text[start : text.index(". ", start)]))
        if listed != all_labels:
            problems.append(
                f"docs/operations.md:{number}: the labels listed ({', '.join(sorted(listed))})"
                f" are not those the metrics use ({', '.join(sorted(all_labels))})"
            )
    report(problems, "the metrics table of docs/operations.md disagrees with the code")


# --- the cargotrack command -----------------------------------------------------------

#: Subcommands that hand their arguments to a parser of their own.
DELEGATED_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "eta-eval": eta_eval.build_parser,
    "eta-report": eta_report.build_parser,
}
SHELL_BREAKS = {"|", "||", "&&", ";", "#", "\\", "--"}


def code_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every line of a fenced block and every inline code span."""
    fenced = False
    for number, line in numbered_lines(path):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield number, line
        else:
            for span in backticked(line):
                yield number, span


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(name: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    if name in DELEGATED_PARSERS:
        return DELEGATED_PARSERS[name]()
    if any(action.nargs == argparse.REMAINDER for action in parser._actions):
        pytest.fail(
            f"services/cli.py: `cargotrack {name}` hands its arguments to another parser:"
            " add that parser to DELEGATED_PARSERS in tests/contracts/test_docs.py",
            pytrace=False,
        )
    return parser


def quoted_commands(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, [subcommand, arguments...]) of each `cargotrack ...` command quoted in a doc."""
    for number, text in code_texts(path):
        tokens = text.split()
        for index, token in enumerate(tokens):
            if token not in ("cargotrack", "$(cargotrack") and not token.endswith("/cargotrack"):
                continue
            if index and tokens[index - 1] in ("-n", "--namespace", "namespace"):
                continue
            rest: list[str] = []
            for word in tokens[index + 1 :]:
                if word in SHELL_BREAKS:
                    break
                ends = word.endswith((")", ";"))
                rest.append(word.rstrip(");"))
                if ends:
                    break
            if rest and re.fullmatch(r"[a-z][a-z0-9-]*", rest[0]):
                yield number, rest


WORD = re.compile(r"[a-z][a-z0-9_-]*")


def argument_problems(
    where: str, command: str, parser: argparse.ArgumentParser, arguments: list[str]
) -> list[str]:
    """What is wrong with `cargotrack COMMAND ARGUMENTS` as quoted at `where`.

    Checks each --option, the value of an option with choices, and the first
    positional when it has choices (descending into nested subcommands).
    """
    problems: list[str] = []
    options = {option: action for action in parser._actions for option in action.option_strings}
    positionals = [a for a in parser._actions if not a.option_strings and a.choices]
    for position, word in enumerate(arguments):
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in options:
                problems.append(
                    f"{where}: `cargotrack {command} {flag}`: no such option"
                    f" (options: {', '.join(sorted(options))})"
                )
                continue
            choices = options[flag].choices
            value = arguments[position + 1] if position + 1 < len(arguments) else ""
            if choices and WORD.fullmatch(value) and value not in choices:
                problems.append(
                    f"{where}: `cargotrack {command} {flag} {value}`: {value!r} is not"
                    f" one of {', '.join(map(str, choices))}"
                )
        elif position == 0 and positionals and WORD.fullmatch(word):
            choices = positionals[0].choices
            assert choices is not None
            if word not in choices:
                problems.append(
                    f"{where}: `cargotrack {command} {word}`: {word!r} is not one of"
                    f" {', '.join(map(str, choices))}"
                )
            elif isinstance(positionals[0], argparse._SubParsersAction):
                nested = positionals[0].choices[word]
                return problems + argument_problems(
                    where, f"{command} {word}", nested, arguments[1:]
                )
    return problems


def test_every_cargotrack_command_and_flag_in_the_docs_exists() -> None:
    commands = subparsers(build_parser())
    assert commands, "services/cli.py: build_parser() has no subcommands"
    problems = []
    for path in doc_files():
        for number, (name, *arguments) in quoted_commands(path):
            where = f"{rel(path)}:{number}"
            if name not in commands:
                problems.append(
                    f"{where}: `cargotrack {name}`: no such subcommand (one of"
                    f" {', '.join(commands)}; services/cli.py build_parser)"
                )
                continue
            parser = command_parser(name, commands[name])
            problems += argument_problems(where, name, parser, arguments)
    report(problems, "cargotrack commands quoted in the docs that do not exist")


def test_the_command_scanner_reads_the_docs() -> None:
    """The scan above sees the commands the README is built around."""
    quoted = {tuple(words[:1]) for path in doc_files() for _, words in quoted_commands(path)}
    assert {("dev",), ("migrate",), ("serve",), ("token",)} <= quoted


# --- tests named in the docs ----------------------------------------------------------

TEST_PATH = re.compile(r"\btests/[A-Za-z0-9_./*-]*[A-Za-z0-9_*/]")
TEST_FILE = re.compile(r"(?<![/\w])(test_[A-Za-z0-9_*]+\.py)(?:::(\w+))?")
TEST_FUNCTION = re.compile(r"(?<![\w/.:*])(test_[a-z0-9_]+)\b(?!\.py|\*)")


def defined_test_names() -> dict[Path, set[str]]:
    """Test file -> names of the functions and classes defined in it."""
    return {
        path: {
            node.name
            for node in ast.walk(parse(path))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        for path in sorted((ROOT / "tests").rglob("test_*.py"))
    }


def test_every_test_file_and_function_the_docs_name_exists() -> None:
    definitions = defined_test_names()
    every_function = set().union(*definitions.values())
    problems = []
    for path in doc_files():
        for number, line in numbered_lines(path):
            where = f"{rel(path)}:{number}"
            for named in TEST_PATH.findall(line):
                if not any(ROOT.glob(named.rstrip("/"))):
                    problems.append(f"{where}: {named} does not exist")
            for file_name, function in TEST_FILE.findall(line):
                files = [p for p in definitions if p.match(file_name)]
                if not files:
                    problems.append(f"{where}: no test file {file_name} under tests/")
                elif function and not any(function in definitions[p] for p in files):
                    problems.append(f"{where}: {file_name} defines no {function}")
            for function in TEST_FUNCTION.findall(line):
                if function not in every_function:
                    problems.append(
                        f"{where}: no test function {function} in tests/: correct the name"
                    )
    report(problems, "tests named in the docs that do not exist")
