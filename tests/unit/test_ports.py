"""Free ports for the local stack and the tests: outside the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest

from devtools.devstack.ports import LOCALHOST, ephemeral_ports, free_port_range, free_ports


def test_free_ports_are_distinct_bindable_and_never_ephemeral() -> None:
    ephemeral = ephemeral_ports()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert not [p for p in ports if p in ephemeral]
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, port))


def test_a_range_overlapping_a_listener_an_avoided_or_an_ephemeral_port_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ephemeral = ephemeral_ports()
    [listening, avoided] = free_ports(2)
    good = free_port_range(6, {listening, avoided})[0]
    candidates: Iterator[int] = iter(
        [listening - 2, avoided - 5, ephemeral.start - 3, ephemeral.stop - 1, good]
    )

    class Scripted:
        """Offers the candidate bases above in order."""

        def randrange(self, start: int, stop: int) -> int:
            return next(candidates)

    monkeypatch.setattr(random, "Random", Scripted)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOCALHOST, listening))
        listener.listen()
        assert free_port_range(6, {avoided}) == range(good, good + 6)
