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
import contextlib
import contextvars
import enum
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt

from shared.config import MIN_HS256_SECRET_BYTES, AuthSettings

log = logging.getLogger(__name__)


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


def current_principal_or_none() -> Principal | None:
    """The caller of the RPC being served, or None on a public method."""
    return _current.get()


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
    kid: str | None = None,
) -> str:
    """An HS256 token for the given role (for the local stack, tests and tooling);
    `kid` names the signing key in the header (JWKS mode)."""
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
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


#: Signature algorithms a JWKS key may have ("none" and anything unknown are refused).
JWKS_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")


class KeyRing:
    """The keys that verify bearer tokens, and how a token's key is chosen.

    - Static mode (no JWKS configured): one key, CARGOTRACK_JWT_SECRET (HS256) or
      CARGOTRACK_JWT_PUBLIC_KEY (RS256/ES256); a token's `kid`, if any, is ignored.
    - JWKS mode (CARGOTRACK_JWKS_FILE or CARGOTRACK_JWKS_URL): a JSON Web Key Set
      (parsed by PyJWT's PyJWKSet). A token must name its key in the JWT header's
      `kid`, and is verified with that key and only that key's algorithm; a `kid`
      not in the set is refused. Several keys may be present at once, which is how
      keys rotate (docs/guarantees.md, "Keys and rotation").

    The set is loaded once at construction (an unreadable file or URL raises
    OSError or PyJWT's error; an unusable set, a key without kid, an algorithm not
    in JWKS_ALGORITHMS or an HMAC key shorter than MIN_HS256_SECRET_BYTES raises
    ValueError: either way the service does not start) and, after `start()`,
    reloaded every `jwks_refresh_s` in a worker thread. A reload that fails keeps
    the previous set and logs why.
    `version` grows with every load that changed the set, so caches of verified
    tokens (VerifiedTokens) forget tokens verified with a key since removed.
    `stop()` ends the refresh task; idempotent, safe before `start()`.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._jwks: jwt.PyJWKSet | None = None
        self._raw: object = None
        self.version = 0
        self._task: asyncio.Task[None] | None = None
        if self.uses_jwks:
            self._install(self._load())

    @property
    def uses_jwks(self) -> bool:
        return bool(self._settings.jwks_file or self._settings.jwks_url)

    def _load(self) -> object:
        """The JWKS document, read from the file or fetched from the URL (blocking)."""
        settings = self._settings
        if settings.jwks_file:
            return json.loads(Path(settings.jwks_file).read_text())
        assert settings.jwks_url
        client = jwt.PyJWKClient(settings.jwks_url, cache_jwk_set=False, timeout=10)
        return client.fetch_data()

    def _install(self, raw: object) -> bool:
        """Parse and check a JWKS document and make it current; False if unchanged."""
        if raw == self._raw:
            return False
        if not isinstance(raw, dict):
            raise ValueError("the JWKS is not a JSON object")
        try:
            jwks = jwt.PyJWKSet.from_dict(raw)
        except jwt.PyJWTError as error:
            raise ValueError(f"unusable JWKS: {error}") from None
        for key in jwks:
            if not key.key_id:
                raise ValueError("every key of the JWKS needs a kid")
            if key.algorithm_name not in JWKS_ALGORITHMS:
                raise ValueError(
                    f"JWKS key {key.key_id!r}: algorithm {key.algorithm_name!r} is not one of "
                    f"{', '.join(JWKS_ALGORITHMS)}"
                )
            if key.algorithm_name.startswith("HS") and len(key.key) < MIN_HS256_SECRET_BYTES:
                raise ValueError(
                    f"JWKS key {key.key_id!r} is {len(key.key)} bytes; "
                    f"HMAC keys need at least {MIN_HS256_SECRET_BYTES}"
                )
        self._jwks, self._raw = jwks, raw
        self.version += 1
        return True

    def key_ids(self) -> list[str]:
        """The kids of the current JWKS (empty in static mode)."""
        return [str(key.key_id) for key in self._jwks or ()]

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key that verifies `token` and the algorithms it may use; AuthError
        when the token names no key or one that is not in the set."""
        if self._jwks is None:
            return self._settings.verification_key, self._settings.algorithms
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as error:
            raise AuthError(f"invalid token: {error}") from None
        if not isinstance(kid, str) or not kid:
            raise AuthError("invalid token: no kid in the header (keys come from a JWKS)")
        try:
            key = self._jwks[kid]
        except KeyError:
            raise AuthError(f"invalid token: unknown kid {kid[:64]!r}") from None
        return key, [key.algorithm_name]

    async def refresh(self) -> bool:
        """Reload the set now (in a worker thread); True if it changed. Raises when
        the new set cannot be read or is unusable (the old one stays)."""
        raw = await asyncio.to_thread(self._load)
        return self._install(raw)

    async def start(self) -> None:
        """Start the periodic refresh (JWKS mode with a positive interval only)."""
        if self.uses_jwks and self._settings.jwks_refresh_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.jwks_refresh_s)
            try:
                if await self.refresh():
                    log.info("JWKS reloaded: keys %s", ", ".join(self.key_ids()))
            except Exception as error:  # keep serving with the keys we have
                log.error("JWKS reload failed, keeping the previous keys: %r", error)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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


def _verify(token: str, settings: AuthSettings, keys: KeyRing | None = None) -> _Verified:
    """Verify the signature and every claim of `token` (PyJWT) with the key `keys`
    selects (by default a KeyRing of `settings`); raises AuthError."""
    try:
        key, algorithms = (keys if keys is not None else KeyRing(settings)).key_for(token)
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub", "iss", "aud"]},
        )
    except jwt.PyJWTError as error:
        raise AuthError(f"invalid token: {error}") from None
    _check_lifetime(claims, settings.max_token_lifetime_s)
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


def _check_lifetime(claims: Mapping[str, Any], max_lifetime_s: int) -> None:
    """Refuse a token valid for longer than max_lifetime_s: `exp - iat`, or
    `exp - now` when it has no `iat` (PyJWT checked both are numbers)."""
    start = _time_claim(claims, "iat") if "iat" in claims else time.time()
    lifetime = _time_claim(claims, "exp") - start
    if lifetime > max_lifetime_s + LEEWAY_S:
        raise AuthError(
            f"invalid token: valid for {lifetime:.0f}s, more than the "
            f"{max_lifetime_s}s allowed (CARGOTRACK_JWT_MAX_LIFETIME_S)"
        )


def verify_token(token: str, settings: AuthSettings) -> Principal:
    """The principal of a valid token; raises AuthError (with a reason) otherwise.

    In JWKS mode this loads the key set on every call: servers verify through one
    VerifiedTokens (and its KeyRing) instead."""
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
    least-recently-used map of at most `max_entries`, emptied whenever the key set
    (`keys`) changes. Every use of a remembered
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
        keys: KeyRing | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._settings = settings
        self.keys = keys if keys is not None else KeyRing(settings)
        self._keys_version = self.keys.version
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; raises AuthError exactly as verify_token."""
        entries = self._entries
        if self.keys.version != self._keys_version:
            # The key set changed: a remembered token may be signed by a removed key.
            entries.clear()
            self._keys_version = self.keys.version
        verified = entries.get(token)
        if verified is None:
            verified = _verify(token, self._settings, self.keys)
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
