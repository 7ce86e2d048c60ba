"""The read model's SQL lives in shared/readmodel/, one module per table (issue 13).

Outside shared/readmodel/ (and the migrations that create the tables), no module of
`shared` or `services` names a read-model table after an SQL keyword; and the status
sets those queries filter on are defined in the domain, not restated as integers.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TABLES = (
    "shipments",
    "vehicles",
    "vehicle_positions",
    "shipment_tracking",
    "eta_history",
    "eta_arrivals",
    "eta_scores",
    "eta_models",
    "learner_state",
    "alert_outbox",
    "webhook_endpoints",
    "webhook_deliveries",
)
SQL = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s+(?:\"?[\w{}]+\"?\.)?(" + "|".join(TABLES) + r")\b"
)
#: A line naming a status beside a tuple or list of three or more small integers.
STATUS_SET = re.compile(
    r"(?i)^.*status.*[(\[]\s*[1-8](?:\s*,\s*[1-8]){2,}\s*,?\s*[)\]]", re.MULTILINE
)


def sources() -> list[Path]:
    found = []
    for top in ("shared", "services", "devtools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(("shared/readmodel/", "shared/pb/")):
                continue
            found.append(path)
    return found


def test_read_model_sql_is_only_in_shared_readmodel() -> None:
    files = sources()
    assert any(p.name == "live.py" for p in files)  # the scan sees the projector
    assert any(p.name == "view.py" for p in files)  # and the dev view (devtools/)
    offenders = {
        path.relative_to(ROOT).as_posix(): sorted(set(SQL.findall(path.read_text())))
        for path in files
        if SQL.search(path.read_text())
    }
    assert offenders == {}, f"SQL on read-model tables outside shared/readmodel: {offenders}"


def test_the_pattern_finds_read_model_sql() -> None:
    assert SQL.findall('"SELECT t.state FROM shipments t JOIN shipment_tracking s"') == [
        "shipments",
        "shipment_tracking",
    ]
    assert SQL.findall("f'UPDATE \"{target}\".alert_outbox n SET'") == ["alert_outbox"]
    assert not SQL.findall("the shipments of a vehicle")


def test_status_sets_are_not_restated_as_integers() -> None:
    assert STATUS_SET.search("ACTIVE_STATUSES = (2, 3, 4, 5, 7)")
    assert STATUS_SET.search('"WHERE status = ANY($1)", [3, 4, 5]')
    assert not STATUS_SET.search("delays = (1, 2, 4)")
    offenders = [
        path.relative_to(ROOT).as_posix()
        for path in sources() + sorted((ROOT / "shared" / "readmodel").glob("*.py"))
        if "domain" not in path.parts and STATUS_SET.search(path.read_text())
    ]
    assert offenders == []
