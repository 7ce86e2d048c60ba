"""The stream caps on a real service: DispatchService.SubscribeDelays against the
session's Kafka (issue 12, finding 6). The caps are GrpcApp's, so WatchShipment and
StreamPoints are bound the same way (tests/integration/test_server_security.py)."""

from __future__ import annotations

import grpc
import pytest

from shared.auth import Role
from tests.ingest_helpers import bearer, service_settings
from tests.integration.test_dispatch import expect_error, running_dispatch, subscribe

pytestmark = pytest.mark.timeout(120)


async def test_subscribers_beyond_the_caps_are_refused(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = service_settings(
        kafka_bootstrap,
        topic_prefix,
        CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL=2,
        CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS=3,
    )
    alice = bearer(Role.DISPATCHER, tenant="tenant-a", subject="alice")
    async with running_dispatch(settings) as dispatch:
        held = [subscribe(dispatch.channel, alice) for _ in range(2)]
        for subscriber in held:
            await subscriber.subscribed()
        refused = await expect_error(subscribe(dispatch.channel, alice))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL" in (refused.details() or "")

        bob = subscribe(dispatch.channel, bearer(Role.DISPATCHER, subject="bob"))
        await bob.subscribed()
        refused = await expect_error(
            subscribe(dispatch.channel, bearer(Role.DISPATCHER, subject="carol"))
        )
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS" in (refused.details() or "")
        for subscriber in [*held, bob]:
            subscriber.cancel()
