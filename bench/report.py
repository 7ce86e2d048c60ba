"""The benchmark's table: every row an absolute figure and its ratio to a raw baseline."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    key: str
    what: str
    value: float
    unit: str
    #: Key of the baseline row this one is divided by; None for baselines themselves.
    baseline: str | None = None
    note: str = ""
    ratio: float = math.nan


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def get(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def value(self, key: str) -> float:
        row = self.get(key)
        return row.value if row is not None else math.nan

    def finish(self) -> None:
        """Compute every ratio (value / baseline value; baselines get 1.0); order the rows
        by section (1 raw baselines, 2 ingest, 3 end to end, 4 query, 5 alerts, 6 rebuild)."""
        self.rows.sort(key=lambda r: r.key.split(".")[0])
        for row in self.rows:
            if row.baseline is None:
                row.ratio = 1.0
                continue
            base = self.value(row.baseline)
            row.ratio = row.value / base if base and math.isfinite(base) else math.nan

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def table(self, markdown: bool = False) -> str:
        header = ("#", "measurement", "value", "unit", "ratio", "vs baseline", "detail")
        lines = []
        body = [
            (
                r.key,
                r.what,
                _fmt(r.value),
                r.unit,
                "1.00 (baseline)" if r.baseline is None else f"{r.ratio:.2f}",
                r.baseline or "",
                r.note,
            )
            for r in self.rows
        ]
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---", "---", "---:", "---", "---:", "---", "---"]) + "|")
            lines.extend("| " + " | ".join(cells) + " |" for cells in body)
        else:
            widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
            fmt = "  ".join(
                f"{{:{'>' if i in (2, 4) else '<'}{w}}}" for i, w in enumerate(widths[:-1])
            )
            lines.append(fmt.format(*header[:-1]) + "  " + header[-1])
            lines.append("  ".join("-" * w for w in widths[:-1]) + "  ------")
            lines.extend(fmt.format(*cells[:-1]) + "  " + cells[-1] for cells in body)
        if self.memory:
            lines.append("")
            mem_header = ("service", "peak RSS MB", "slope MB/min", "grows?")
            mem_body = [
                (
                    m["service"],
                    f"{m['peak_mb']:.0f}",
                    f"{m['slope_mb_per_min']:+.2f}",
                    m["verdict"],
                )
                for m in self.memory
            ]
            if markdown:
                lines.append("| " + " | ".join(mem_header) + " |")
                lines.append("|---|---:|---:|---|")
                lines.extend("| " + " | ".join(c) + " |" for c in mem_body)
            else:
                widths = [
                    max(len(h), *(len(c[i]) for c in mem_body)) for i, h in enumerate(mem_header)
                ]
                fmt = "  ".join(f"{{:<{w}}}" for w in widths)
                lines.append(fmt.format(*mem_header))
                lines.extend(fmt.format(*c) for c in mem_body)
        if self.targets:
            lines.append("")
            bullet = "- " if markdown else ""
            for target in self.targets:
                lines.append(
                    f"{bullet}target {target['target']}: {target['measured']} -> "
                    f"{'MET' if target['met'] else 'NOT MET'}"
                )
        if self.machine:
            lines.append("")
            lines.append(
                ("- " if markdown else "")
                + "machine: "
                + ", ".join(f"{k}={v}" for k, v in self.machine.items() if k != "load_samples")
            )
        for note in self.notes:
            lines.append(f"{'- ' if markdown else ''}note: {note}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
