"""The gRPC server's limits and key rotation against real servers (issue 12,
findings 6 and 7).

A `GrpcApp` (the server every cargotrack service runs) with a small probe service:
`Hold` streams the connection's peer address, then holds the stream open until the
test releases it; `Peer` answers the peer address (one per TCP connection).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from shared.auth import Role
from shared.config import GrpcLimits, GrpcSettings, load_settings
from shared.rpc import Context, GrpcApp, Registrar
from tests.ingest_helpers import UNUSED_DATABASE_URL, Metadata, bearer, wait_health

pytestmark = pytest.mark.timeout(60)

SERVICE = "cargotrack.test.Probe"
HOLD = f"/{SERVICE}/Hold"
PEER = f"/{SERVICE}/Peer"


class Probe:
    """The probe service; `release` ends every held stream normally."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def hold(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield context.peer().encode()
        await self.release.wait()
        yield b"done"

    async def peer(self, request: bytes, context: Context) -> bytes:
        return str(context.peer()).encode()

    def registrar(self) -> Registrar:
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hold": grpc.unary_stream_rpc_method_handler(self.hold),
                "Peer": grpc.unary_unary_rpc_method_handler(self.peer),
            },
        )
        return lambda server: server.add_generic_rpc_handlers([handler])


def grpc_settings(**limits: Any) -> GrpcSettings:
    base = load_settings(
        {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "DATABASE_URL": UNUSED_DATABASE_URL}
        | {"CARGOTRACK_DEV_MODE": "1", "CARGOTRACK_SHUTDOWN_GRACE_S": "1"}
    )
    return dataclasses.replace(base.grpc, limits=dataclasses.replace(GrpcLimits(), **limits))


@pytest.fixture
def probe() -> Probe:
    return Probe()


async def serve(probe: Probe, settings: GrpcSettings, **auth_environ: str) -> GrpcApp:
    auth = load_settings(
        {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "DATABASE_URL": UNUSED_DATABASE_URL}
        | (auth_environ or {"CARGOTRACK_DEV_MODE": "1"})
    ).auth
    app = GrpcApp(
        settings, auth, [(SERVICE, probe.registrar())], {HOLD: {Role.OPS}, PEER: {Role.OPS}}
    )
    await app.start()
    return app


def ops(subject: str) -> Metadata:
    return bearer(Role.OPS, subject=subject)


def hold(channel: grpc.aio.Channel, metadata: Metadata) -> grpc.aio.UnaryStreamCall:
    return channel.unary_stream(HOLD)(b"", metadata=metadata, timeout=30)


async def opened(call: grpc.aio.UnaryStreamCall) -> bytes:
    """The stream's first message: the server is serving it."""
    first: bytes = await call.read()
    return first


async def wait_open_streams(app: GrpcApp, count: int) -> None:
    async with asyncio.timeout(10):
        while app.stream_limits.open_streams != count:  # noqa: ASYNC110 - polls server state
            await asyncio.sleep(0.01)


def cancel_all(calls: Sequence[grpc.aio.UnaryStreamCall]) -> None:
    for call in calls:
        call.cancel()


async def test_streams_per_principal(probe: Probe) -> None:
    app = await serve(probe, grpc_settings(max_streams_per_principal=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            mine = [hold(channel, ops("alice")) for _ in range(2)]
            for call in mine:
                await opened(call)
            third = hold(channel, ops("alice"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await opened(third)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL" in (refused.value.details() or "")
            # Another principal is not affected.
            other = hold(channel, ops("bob"))
            await opened(other)
            # A slot frees when a stream ends.
            mine[0].cancel()
            await wait_open_streams(app, 2)
            again = hold(channel, ops("alice"))
            await opened(again)
            cancel_all([*mine, other, again])
    finally:
        await app.stop()


async def test_streams_per_process(probe: Probe) -> None:
    app = await serve(probe, grpc_settings(max_streams_per_process=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            held = [hold(channel, ops(name)) for name in ("alice", "bob")]
            for call in held:
                await opened(call)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await opened(hold(channel, ops("carol")))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS" in (refused.value.details() or "")
            # Unary calls are not counted.
            await channel.unary_unary(PEER)(b"", metadata=ops("carol"), timeout=10)
            cancel_all(held)
    finally:
        await app.stop()


async def test_concurrent_streams_per_connection(probe: Probe) -> None:
    """grpc.max_concurrent_streams: a third call on one connection waits (in the
    client) until one of the two open ones ends; it is never served beside them."""
    app = await serve(probe, grpc_settings(max_concurrent_streams=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            held = [hold(channel, ops(f"user-{i}")) for i in range(2)]
            for call in held:
                await opened(call)
            third = hold(channel, ops("user-2"))
            waiting = asyncio.create_task(opened(third))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), 1.0)
            assert app.stream_limits.open_streams == 2
            held[0].cancel()
            await waiting
            cancel_all([*held, third])
    finally:
        await app.stop()


async def test_connection_is_replaced_after_max_age_and_its_streams_drain(probe: Probe) -> None:
    app = await serve(
        probe, grpc_settings(max_connection_age_s=0.5, max_connection_age_grace_s=30.0)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stream = hold(channel, ops("alice"))
            first_peer = await opened(stream)
            # After GOAWAY the channel opens a new connection (a new client port).
            async with asyncio.timeout(20):
                while True:
                    peer = await channel.unary_unary(PEER)(b"", metadata=ops("alice"), timeout=5)
                    if peer != first_peer:
                        break
                    await asyncio.sleep(0.1)
            # The stream opened on the old connection is still served to its end.
            probe.release.set()
            assert await stream.read() == b"done"
            assert await stream.code() == grpc.StatusCode.OK
    finally:
        await app.stop()


async def test_stream_past_max_age_grace_is_ended(probe: Probe) -> None:
    app = await serve(
        probe, grpc_settings(max_connection_age_s=0.3, max_connection_age_grace_s=0.5)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stream = hold(channel, ops("alice"))
            await opened(stream)
            async with asyncio.timeout(20):
                code = await stream.code()
            assert code == grpc.StatusCode.UNAVAILABLE
            await wait_open_streams(app, 0)
    finally:
        await app.stop()


async def test_client_pinging_too_often_is_sent_away(probe: Probe) -> None:
    """The keepalive policy: pings without data more often than min_ping_interval
    are strikes, and after max_ping_strikes the server closes the connection."""
    app = await serve(probe, grpc_settings(min_ping_interval_s=10.0))
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
            stream = hold(channel, ops("alice"))
            await opened(stream)
            async with asyncio.timeout(20):
                code = await stream.code()
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()


def write_jwks(path: Path, **keys: str) -> None:
    def jwk(kid: str, secret: str) -> dict[str, str]:
        encoded = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
        return {"kty": "oct", "kid": kid, "alg": "HS256", "k": encoded}

    path.write_text(json.dumps({"keys": [jwk(kid, secret) for kid, secret in keys.items()]}))


async def test_keys_rotate_without_a_restart(probe: Probe, tmp_path: Path) -> None:
    """JWKS by kid, reloaded by the running server: during the overlap tokens of the
    old and the new key both verify; once the old key is removed, its tokens are
    refused with UNAUTHENTICATED."""
    old_key, new_key = "old-key-" + "o" * 32, "new-key-" + "n" * 32
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, old=old_key)
    app = await serve(
        probe,
        grpc_settings(),
        CARGOTRACK_JWKS_FILE=str(jwks),
        CARGOTRACK_JWKS_REFRESH_S="0.1",
    )
    old = bearer(Role.OPS, secret=old_key, kid="old")
    new = bearer(Role.OPS, secret=new_key, kid="new")

    async def code(metadata: Metadata) -> grpc.StatusCode:
        try:
            await channel.unary_unary(PEER)(b"", metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def until(metadata: Metadata, wanted: grpc.StatusCode) -> None:
        async with asyncio.timeout(10):
            while await code(metadata) != wanted:  # noqa: ASYNC110 - polls the server
                await asyncio.sleep(0.05)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            assert await code(old) == grpc.StatusCode.OK
            assert await code(new) == grpc.StatusCode.UNAUTHENTICATED
            write_jwks(jwks, old=old_key, new=new_key)
            await until(new, grpc.StatusCode.OK)
            assert await code(old) == grpc.StatusCode.OK
            write_jwks(jwks, new=new_key)
            await until(old, grpc.StatusCode.UNAUTHENTICATED)
            assert await code(new) == grpc.StatusCode.OK
    finally:
        await app.stop()


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    directory = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        directory / "ca.key",
        "-out",
        directory / "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=cargotrack-test-ca",
    )
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        (directory / f"{name}.ext").write_text(extension + "\n" if extension else "\n")
        openssl(
            "req",
            *ec,
            "-keyout",
            directory / f"{name}.key",
            "-out",
            directory / f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            directory / f"{name}.csr",
            "-CA",
            directory / "ca.crt",
            "-CAkey",
            directory / "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            directory / f"{name}.crt",
            "-extfile",
            directory / f"{name}.ext",
        )
    return directory


async def test_mutual_tls_and_the_plaintext_health_port(probe: Probe, certificates: Path) -> None:
    """With a client CA the server requires a client certificate; the health port
    answers kubelet-style plaintext probes and serves nothing but health."""
    settings = dataclasses.replace(
        grpc_settings(),
        tls_cert_file=str(certificates / "server.crt"),
        tls_key_file=str(certificates / "server.key"),
        tls_client_ca_file=str(certificates / "ca.crt"),
        health_port=0,
    )
    app = await serve(probe, settings)
    ca = (certificates / "ca.crt").read_bytes()
    with_client_cert = grpc.ssl_channel_credentials(
        ca, (certificates / "client.key").read_bytes(), (certificates / "client.crt").read_bytes()
    )
    try:
        target = f"127.0.0.1:{app.port}"
        async with grpc.aio.secure_channel(target, with_client_cert) as channel:
            peer = await channel.unary_unary(PEER)(b"", metadata=ops("alice"), timeout=10)
            assert peer
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(PEER)(b"", metadata=ops("alice"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as channel:
            await app.set_serving(True)
            await wait_health(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await channel.unary_unary(PEER)(b"", metadata=ops("alice"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await app.stop()
