"""The SSRF guard: a webhook may only reach public addresses (docs/webhooks.md).

Checked twice: when an endpoint is registered (`check_target`: the URL, then every
address its host resolves to), and on every connection the sender makes
(`GuardedResolver`: aiohttp connects only to addresses this resolver returned, each
checked after resolution, so a host that re-resolves to a private address later, DNS
rebinding, is refused then). An IP-literal host is checked before the request
(aiohttp does not resolve literals). Redirects are never followed. With
CARGOTRACK_WEBHOOK_ALLOW_PRIVATE (development only) nothing is refused for its address.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from shared.domain.webhooks import IpAddress, Target, refusal


class TargetRefused(OSError):
    """The target's address is one webhooks may not reach (or it does not resolve).

    An OSError with `strerror` set: aiohttp wraps what its resolver raises into a
    ClientConnectorDNSError whose message quotes the strerror."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_addresses(host: str, addresses: list[IpAddress], allow_private: bool) -> None:
    """Raise TargetRefused naming the first address that may not be reached."""
    if not addresses:
        raise TargetRefused(f"{host} resolves to no address")
    if allow_private:
        return
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise TargetRefused(f"{host}: {reason}")


def _address(text: str) -> IpAddress:
    # getaddrinfo gives IPv6 link-local addresses with a scope ("fe80::1%eth0").
    return ipaddress.ip_address(text.split("%", 1)[0])


#: How long a registration waits for DNS.
RESOLVE_TIMEOUT_S = 3.0


async def resolve(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[IpAddress]:
    """Every address `host` resolves to (TargetRefused when it does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise TargetRefused(f"{host} did not resolve within {timeout_s:g} s") from None
    except (socket.gaierror, UnicodeError) as error:
        raise TargetRefused(f"{host} does not resolve: {error}") from None
    return [_address(str(info[4][0])) for info in infos]


async def check_target(target: Target, allow_private: bool) -> None:
    """At registration: refuse a target any of whose addresses is not public."""
    addresses = (
        [target.address] if target.address is not None else await resolve(target.host, target.port)
    )
    check_addresses(target.host, addresses, allow_private)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing any result that is not a public address."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        check_addresses(host, [_address(r["host"]) for r in results], self._allow_private)
        return results

    async def close(self) -> None:
        await self._inner.close()
