"""Reading a version's golden records, and folding them with today's code.

Layout of one version, `tests/contracts/golden/<version>/`:

* `records.json`: the records in topic order, each with its name, logical topic, key,
  value (base64) and headers (name, text), exactly as the version wrote them;
* `expected/<name>.json`: what today's code must make of them, written as JSON and
  reviewed by hand: one file per shipment and vehicle state (shared.statecodec's
  JSON of the fold's state), the alerts as dispatch reads them, the dead letters;
* `NOTES.md`: how and from which commit the records were made.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from services.projector.projection import merge_by_recorded_time
from shared import statecodec
from shared.domain import tracking
from shared.envelopes import Headers, PoisonRecord, decode
from shared.projection import Delivered

GOLDEN = Path(__file__).resolve().parent
SHIPMENT_TOPICS = ("shipment-events", "delivery-confirmations")


@dataclass(frozen=True)
class StoredRecord:
    name: str
    topic: str
    key: bytes
    value: bytes
    headers: Headers


def versions() -> list[str]:
    """The versions with golden records, oldest first (by their numbers)."""

    def number(name: str) -> tuple[int, ...]:
        return tuple(int(part) for part in name.removeprefix("v").split("."))

    return sorted(
        (p.name for p in GOLDEN.iterdir() if p.is_dir() and (p / "records.json").is_file()),
        key=number,
    )


def load(version: str) -> list[StoredRecord]:
    raw = json.loads((GOLDEN / version / "records.json").read_text())
    return [
        StoredRecord(
            name=item["name"],
            topic=item["topic"],
            key=item["key"].encode(),
            value=base64.b64decode(item["value_base64"]),
            headers=[(name, value.encode()) for name, value in item["headers"]],
        )
        for item in raw
    ]


def expected(version: str) -> dict[str, Any]:
    folder = GOLDEN / version / "expected"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def fold(records: list[StoredRecord]) -> dict[str, Any]:
    """What today's code makes of a version's records, as the JSON the expected files hold.

    Decodes every record with shared.envelopes.decode (the projector's and dispatch's
    decoder, headers checked), then: shipment events and delivery confirmations merged
    across their topics by the time they were accepted (as the projector does) and
    folded with tracking.apply per shipment; GPS batches folded with tracking.apply_gps
    per vehicle; alerts as the canonical JSON of the decoded envelope (what dispatch
    sends on); dead letters as their key, headers and value, and whether today's decoder still
    refuses the value (the reason's wording may change; the refusal must not).
    """
    result: dict[str, Any] = {}
    shipment_records: list[Delivered] = []
    vehicles: dict[str, tracking.VehicleState] = {}
    alerts: list[Any] = []
    dead_letters: list[Any] = []
    for offset, record in enumerate(records):
        if record.topic == "dead-letters":
            try:
                decode(record.value, record.headers)
            except PoisonRecord:
                still_refused = True
            else:
                still_refused = False
            dead_letters.append(
                {
                    "key": record.key.decode(),
                    "headers": {name: value.decode() for name, value in record.headers},
                    "value_base64": base64.b64encode(record.value).decode(),
                    "still_refused": still_refused,
                }
            )
            continue
        envelope = decode(record.value, record.headers)
        if record.topic in SHIPMENT_TOPICS:
            shipment_records.append(Delivered(record.topic, 0, offset, record.key, envelope))
        elif record.topic == "gps-points":
            vehicle_id = envelope.gps_batch.vehicle_id
            vehicles[vehicle_id] = tracking.apply_gps(vehicles.get(vehicle_id), envelope)
        elif record.topic == "shipment-alerts":
            alerts.append(json_format.MessageToDict(envelope))
        else:
            raise ValueError(f"{record.name}: unknown topic {record.topic}")
    shipments: dict[str, tracking.ShipmentState | None] = {}
    for delivered in merge_by_recorded_time(shipment_records):
        envelope = delivered.envelope
        shipment_id = (
            envelope.shipment_event.shipment_id
            if envelope.WhichOneof("payload") == "shipment_event"
            else envelope.delivery_confirmation.shipment_id
        )
        shipments[shipment_id] = tracking.apply(shipments.get(shipment_id), envelope)
    for shipment_id, state in shipments.items():
        result[f"shipment-{shipment_id}"] = statecodec.encode(state)
    for vehicle_id, vehicle in vehicles.items():
        result[f"vehicle-{vehicle_id}"] = statecodec.encode(vehicle)
    result["alerts"] = alerts
    result["dead-letters"] = dead_letters
    return result
