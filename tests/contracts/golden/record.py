"""Add a version's golden records: `python -m tests.contracts.golden.record VERSION`.

Run it at a release (VERSION as tagged, e.g. v0.2.0), with that release's code checked
out. It writes `tests/contracts/golden/VERSION/`:

* `records.json`: the scenario's records (tests/contracts/golden/scenario.py) as this
  code writes them, bytes and headers;
* `expected/`: copied from the newest earlier version. The scenario's facts are the
  same in every version, so the state they fold to must be too: the new version's
  records have to fold to what the old ones did. When no earlier version exists, the
  fold of today's code is written instead, to be reviewed by hand before it is
  committed (the command says so);
* `NOTES.md`: how, when and from which commit the records were made.

An existing version is never overwritten (its records are history); `--force` replaces
one that was made by mistake before it was committed.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime

from tests.contracts.golden import corpus, scenario


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=corpus.GOLDEN, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=corpus.GOLDEN, capture_output=True, text=True
    )
    commit = result.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the release, e.g. v0.2.0")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"v\d+\.\d+\.\d+", args.version):
        parser.error("VERSION looks like v1.2.3")
    target = corpus.GOLDEN / args.version
    if target.exists():
        if not args.force:
            parser.error(f"{target} exists: golden records are history, never rewritten")
        shutil.rmtree(target)
    earlier = [v for v in corpus.versions() if v != args.version]
    records = scenario.golden_records()
    (target / "expected").mkdir(parents=True)
    items = [
        {
            "name": r.name,
            "topic": r.topic,
            "note": r.note,
            "key": r.record.key.decode(),
            "value_base64": base64.b64encode(r.record.value).decode(),
            "headers": [[name, value.decode()] for name, value in r.record.headers],
        }
        for r in records
    ]
    (target / "records.json").write_text(json.dumps(items, indent=2) + "\n")
    if earlier:
        source = corpus.GOLDEN / earlier[-1] / "expected"
        for path in source.glob("*.json"):
            shutil.copy(path, target / "expected" / path.name)
        how_expected = f"copied from {earlier[-1]} (the same facts must fold the same way)"
    else:
        for name, value in corpus.fold(corpus.load(args.version)).items():
            text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
            (target / "expected" / f"{name}.json").write_text(text + "\n")
        how_expected = "the fold of this code: REVIEW EVERY FILE BY HAND before committing"
    notes = [
        f"# Golden records of {args.version}",
        "",
        f"Made {datetime.now(UTC):%Y-%m-%d} by `python -m tests.contracts.golden.record"
        f" {args.version}` at commit {_commit()}.",
        "The facts are those of tests/contracts/golden/scenario.py; each record was written",
        "by the code path named there (the services' envelope builders and encoders).",
        f"expected/: {how_expected}.",
        "",
        "| record | topic | what |",
        "|---|---|---|",
        *(f"| `{r.name}` | {r.topic} | {r.note} |" for r in records),
        "",
    ]
    (target / "NOTES.md").write_text("\n".join(notes))
    print(f"wrote {len(records)} records to {target.relative_to(corpus.GOLDEN.parents[2])}")
    print(f"expected states: {how_expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
