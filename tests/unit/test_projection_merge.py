"""Merging a poll batch's partitions by accept time keeps each partition's order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.projector.projection import merge_by_recorded_time
from shared.pb import envelope_pb2
from shared.projection import Delivered


def _record(topic: str, partition: int, offset: int, recorded_s: int) -> Delivered:
    envelope = envelope_pb2.Envelope(event_id=f"{topic}-{partition}-{offset}")
    envelope.recorded_at.seconds = recorded_s
    return Delivered(topic, partition, offset, None, envelope)


def test_a_confirmation_accepted_later_folds_after_the_event() -> None:
    events = [_record("events", 0, 0, 100), _record("events", 0, 1, 300)]
    confirmations = [_record("confirmations", 0, 0, 200)]
    merged = merge_by_recorded_time(confirmations + events)
    assert [(r.topic, r.offset) for r in merged] == [
        ("events", 0),
        ("confirmations", 0),
        ("events", 1),
    ]


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(0, 50)),
        max_size=40,
    )
)
def test_each_partition_keeps_its_log_order(spec: list[tuple[str, int, int]]) -> None:
    records = [_record(topic, partition, i, t) for i, (topic, partition, t) in enumerate(spec)]
    merged = merge_by_recorded_time(records)
    assert sorted(r.offset for r in merged) == list(range(len(records)))
    for key in {(r.topic, r.partition) for r in records}:
        original = [r.offset for r in records if (r.topic, r.partition) == key]
        assert [r.offset for r in merged if (r.topic, r.partition) == key] == original
