"""Bearer-token authentication and role checks for every gRPC server.

A token is a JWT with the claims `sub`, `tenant`, `role`, and, by role,
`vehicle_id` (driver) or `customer_id` (customer). The tenant of everything a
caller writes or reads comes from its token, never from a request payload.

Roles:
- driver: streams GPS and confirms deliveries, only for its own vehicle;
- shipper, ops: record shipment events for their tenant; ops also read;
- customer: reads only its own shipments;
- dispatcher: reads and subscribes to alerts for its tenant.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt

from shared.config import AuthSettings


class Role(enum.StrEnum):
    DRIVER = "driver"
    SHIPPER = "shipper"
    OPS = "ops"
    CUSTOMER = "customer"
    DISPATCHER = "dispatcher"


@dataclass(frozen=True)
class Principal:
    """Who is calling, as the verified token says."""

    subject: str
    tenant_id: str
    role: Role
    vehicle_id: str | None = None
    customer_id: str | None = None
    #: The token's `exp` (Unix seconds); a stream ends when it passes (see
    #: AuthInterceptor). Not part of the identity: two tokens of one caller are equal.
    expires_at: float | None = field(default=None, compare=False)


class AuthError(Exception):
    """The token is missing, malformed, expired or signed with the wrong key."""


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "cargotrack_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being served. Only valid inside a servicer method
    behind AuthInterceptor on a method that requires authentication."""
    principal = _current.get()
    if principal is None:
        raise RuntimeError("no authenticated principal: is the method marked public?")
    return principal


def mint_token(
    secret: str,
    *,
    role: Role,
    tenant_id: str,
    subject: str,
    vehicle_id: str | None = None,
    customer_id: str | None = None,
    ttl_s: int = 24 * 3600,
    issuer: str = "cargotrack",
    audience: str = "cargotrack",
) -> str:
    """An HS256 token for the given role (for the local stack, tests and tooling)."""
    if role is Role.DRIVER and not vehicle_id:
        raise ValueError("a driver token needs a vehicle id")
    if role is Role.CUSTOMER and not customer_id:
        raise ValueError("a customer token needs a customer id")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "tenant": tenant_id,
        "role": role.value,
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "exp": now + ttl_s,
    }
    if vehicle_id:
        claims["vehicle_id"] = vehicle_id
    if customer_id:
        claims["customer_id"] = customer_id
    return jwt.encode(claims, secret, algorithm="HS256")


#: Seconds of clock skew tolerated on the time claims (`exp`, `nbf`, `iat`): what PyJWT
#: is given, and what `VerifiedTokens` applies to the tokens it remembers.
LEEWAY_S = 0


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims were verified: its principal, and the time
    claims that decide, at every later use, whether it is still valid."""

    principal: Principal
    expires: int
    not_before: int | None
    issued_at: int | None


#: Longest identifier claim accepted (as for ids in requests: validation.MAX_ID_LENGTH).
MAX_CLAIM_LENGTH = 128
#: Longest `sub` accepted: identity providers' subjects are opaque and may be longer.
MAX_SUBJECT_LENGTH = 256


def _text_claim(
    claims: Mapping[str, Any], name: str, *, required: bool = False, subject: bool = False
) -> str | None:
    """The claim as an identifier string; AuthError unless it is one.

    A correctly signed token can still carry a claim of the wrong JSON type (a number,
    a list, an object) or an id no request could carry (NUL, a lone surrogate,
    whitespace, over-long): it is refused here, as UNAUTHENTICATED, rather than
    reaching a query as a value that fails there with INTERNAL (issue 12, finding 5).
    Absent (or null) is None; required and absent is an error. The subject (only
    logged and recorded as the envelope's principal) may hold spaces and be up to
    MAX_SUBJECT_LENGTH characters.
    """
    value = claims.get(name)
    if value is None:
        if required:
            raise AuthError(f"invalid token: no {name} claim")
        return None
    if not isinstance(value, str):
        raise AuthError(f"invalid token: the {name} claim must be a string")
    if not value:
        if required:
            raise AuthError(f"invalid token: the {name} claim is empty")
        return None
    longest = MAX_SUBJECT_LENGTH if subject else MAX_CLAIM_LENGTH
    if (
        len(value) > longest
        or not value.isprintable()  # NUL, control characters and lone surrogates too
        or (not subject and any(ch.isspace() for ch in value))
    ):
        raise AuthError(
            f"invalid token: the {name} claim must be 1 to {longest} printable characters"
            + ("" if subject else " without whitespace")
        )
    return value


#: Time claims beyond this (year 10000) are refused: no clock or datetime reaches them.
MAX_TIME_CLAIM = 253_402_300_799


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    """A time claim PyJWT accepted (an integer), within what clocks and datetimes can
    represent; AuthError otherwise (10**400 passes PyJWT but overflows a float)."""
    value = int(claims[name])
    if not 0 <= value <= MAX_TIME_CLAIM:
        raise AuthError(f"invalid token: the {name} claim is out of range")
    return float(value)


def _verify(token: str, settings: AuthSettings) -> _Verified:
    """Verify the signature and every claim of `token` (PyJWT); raises AuthError."""
    try:
        claims = jwt.decode(
            token,
            settings.verification_key,
            algorithms=settings.algorithms,
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub", "iss", "aud"]},
        )
    except jwt.PyJWTError as error:
        raise AuthError(f"invalid token: {error}") from None
    raw_role = claims.get("role")
    try:
        if not isinstance(raw_role, str):
            raise ValueError(raw_role)
        role = Role(raw_role)
    except ValueError:
        raise AuthError(f"invalid token: unknown role {claims.get('role')!r}") from None
    principal = Principal(
        subject=_text_claim(claims, "sub", required=True, subject=True) or "",
        tenant_id=_text_claim(claims, "tenant", required=True) or "",
        role=role,
        vehicle_id=_text_claim(claims, "vehicle_id"),
        customer_id=_text_claim(claims, "customer_id"),
        expires_at=_time_claim(claims, "exp"),
    )
    if role is Role.DRIVER and not principal.vehicle_id:
        raise AuthError("invalid token: a driver token needs a vehicle_id claim")
    if role is Role.CUSTOMER and not principal.customer_id:
        raise AuthError("invalid token: a customer token needs a customer_id claim")
    # PyJWT accepted these claims, so int() of each succeeds (it converts them the same way).
    return _Verified(
        principal,
        expires=int(claims["exp"]),
        not_before=int(claims["nbf"]) if "nbf" in claims else None,
        issued_at=int(claims["iat"]) if "iat" in claims else None,
    )


def verify_token(token: str, settings: AuthSettings) -> Principal:
    """The principal of a valid token; raises AuthError (with a reason) otherwise."""
    return _verify(token, settings).principal


# PyJWT's own reasons for the time claims, so that a remembered token is refused with
# exactly the message a fresh verification gives (tests compare the two).
_NOT_YET_VALID_IAT = (
    f"invalid token: {jwt.ImmatureSignatureError('The token is not yet valid (iat)')}"
)
_NOT_YET_VALID_NBF = (
    f"invalid token: {jwt.ImmatureSignatureError('The token is not yet valid (nbf)')}"
)
_EXPIRED = f"invalid token: {jwt.ExpiredSignatureError('Signature has expired')}"


class VerifiedTokens:
    """`verify_token` for one AuthSettings, remembering the tokens it verified.

    Clients send the same bearer token on every call, and checking its signature
    each time was 13 % of tracking-query's CPU. A token that verified is remembered,
    keyed by its exact text (the signature was checked for exactly those bytes), in a
    least-recently-used map of at most `max_entries`. Every use of a remembered
    token checks its time claims again against `clock()`, in PyJWT's order and with
    its leeway (`LEEWAY_S`): `iat` and `nbf` not in the future, `exp` not reached;
    a token that fails is forgotten and refused with PyJWT's message. Tokens that
    fail verification are never remembered, so only valid tokens take room.

    For one event loop (gRPC aio): not thread-safe.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._settings = settings
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; raises AuthError exactly as verify_token."""
        entries = self._entries
        verified = entries.get(token)
        if verified is None:
            verified = _verify(token, self._settings)
            entries[token] = verified
            if len(entries) > self._max_entries:
                entries.popitem(last=False)
            return verified.principal
        now = self._clock()
        reason = None
        if verified.issued_at is not None and verified.issued_at > now + LEEWAY_S:
            reason = _NOT_YET_VALID_IAT
        elif verified.not_before is not None and verified.not_before > now + LEEWAY_S:
            reason = _NOT_YET_VALID_NBF
        elif verified.expires <= now - LEEWAY_S:
            reason = _EXPIRED
        if reason is not None:
            entries.pop(token, None)
            raise AuthError(reason)
        entries.move_to_end(token)
        return verified.principal


#: Methods every server exposes without a token: health and reflection.
ALWAYS_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _bearer(metadata: Collection[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    return wrap_behaviour(handler, lambda _original: abort)


def wrap_behaviour(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """The same handler kind with its behaviour wrapped (grpc has four kinds)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream),
        handler.request_deserializer,
        handler.response_serializer,
    )


#: What a stream's status says when the caller's token expires while it runs.
STREAM_TOKEN_EXPIRED = "the bearer token expired during the stream: renew it and resume"


async def _until_expiry(
    responses: AsyncIterator[Any], expires_at: float, context: Any
) -> AsyncIterator[Any]:
    """The responses of a stream until the caller's token expires, then UNAUTHENTICATED.

    The wait for each next response is bounded by the expiry (a timeout, not a
    task per message): at expiry the servicer's generator is cancelled where it
    waits (its cleanup runs, as when a client cancels) and the stream ends with
    UNAUTHENTICATED, STREAM_TOKEN_EXPIRED. Issue 12, finding 3: streams used to
    outlive their token. The client renews its token and resumes (WatchShipment:
    watch again, the first message is the current state; SubscribeDelays: the
    resume token of the last alert received), so nothing is lost.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (expires_at - time.time())
    try:
        while loop.time() < deadline:
            timeout = asyncio.timeout_at(deadline)
            try:
                async with timeout:
                    response = await anext(responses)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if timeout.expired():
                    break
                raise
            yield response
    finally:
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            await aclose()
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, STREAM_TOKEN_EXPIRED)


def _with_principal(principal: Principal) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        import inspect

        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any) -> Any:
                _current.set(principal)
                responses = behaviour(request, context)
                if principal.expires_at is not None:
                    responses = _until_expiry(responses, principal.expires_at, context)
                async for response in responses:
                    yield response

            return stream

        async def call(request: Any, context: Any) -> Any:
            _current.set(principal)
            return await behaviour(request, context)

        return call

    return wrap


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Verifies the bearer token and the caller's role before any servicer code runs.

    `roles` maps full method names ("/cargotrack.v1.X/Method") to the roles allowed
    to call them; a method absent from `roles` and from `public` is refused with
    PERMISSION_DENIED, so a new method is closed until someone opens it. Missing
    or invalid tokens get UNAUTHENTICATED. Finer checks (a driver's own vehicle, a
    customer's own shipments) belong to the servicer, which reads
    `current_principal()`. Tokens are verified through `tokens` (by default a
    `VerifiedTokens` of `settings`): a client's repeated token is verified once and
    its expiry checked on every call. A streaming response ends with UNAUTHENTICATED
    when the token expires while it runs (see `_until_expiry`).
    """

    def __init__(
        self,
        settings: AuthSettings,
        roles: Mapping[str, Collection[Role]],
        public: Collection[str] = (),
        *,
        tokens: VerifiedTokens | None = None,
    ) -> None:
        self._settings = settings
        self._tokens = tokens if tokens is not None else VerifiedTokens(settings)
        self._roles = roles
        self._public = set(public)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method in self._public or method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return handler
        token = _bearer(details.invocation_metadata)
        if token is None:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            principal = self._tokens.verify(token)
        except AuthError as error:
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, str(error))
        allowed = self._roles.get(method, ())
        if principal.role not in allowed:
            return _abort_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {principal.role.value} may not call {method}",
            )
        return wrap_behaviour(handler, _with_principal(principal))
