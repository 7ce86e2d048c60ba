"""Bearer tokens: minting, verification, expiry, keys, and the claims each role needs."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import grpc
import jwt
import pytest

from shared import auth
from shared.auth import (
    AuthError,
    AuthInterceptor,
    Principal,
    Role,
    VerifiedTokens,
    current_principal,
    mint_token,
    verify_token,
)
from shared.config import AuthSettings

SECRET = "unit-test-signing-key-" + "0123456789abcdef" * 3  # 64+ bytes: fine for HS512 too
SETTINGS = AuthSettings(jwt_secret=SECRET)


def signed(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    """A token with exactly these claims (plus valid iss/aud/exp/sub unless given)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "someone",
        "iss": "cargotrack",
        "aud": "cargotrack",
        "iat": now,
        "exp": now + 600,
        "tenant": "tenant-a",
        "role": "ops",
    }
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, secret, algorithm=algorithm)


@pytest.mark.parametrize(
    ("role", "extra"),
    [
        (Role.DRIVER, {"vehicle_id": "veh-1"}),
        (Role.SHIPPER, {}),
        (Role.OPS, {}),
        (Role.CUSTOMER, {"customer_id": "cust-1"}),
        (Role.DISPATCHER, {}),
    ],
)
def test_a_minted_token_verifies_to_its_principal(role: Role, extra: dict[str, str]) -> None:
    token = mint_token(
        SECRET,
        role=role,
        tenant_id="tenant-a",
        subject="who",
        vehicle_id=extra.get("vehicle_id"),
        customer_id=extra.get("customer_id"),
    )
    assert verify_token(token, SETTINGS) == Principal(
        subject="who",
        tenant_id="tenant-a",
        role=role,
        vehicle_id=extra.get("vehicle_id"),
        customer_id=extra.get("customer_id"),
    )


def test_an_expired_token_is_refused() -> None:
    token = mint_token(SECRET, role=Role.OPS, tenant_id="t", subject="s", ttl_s=-1)
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, SETTINGS)


def test_a_token_is_valid_until_it_expires() -> None:
    token = mint_token(SECRET, role=Role.OPS, tenant_id="t", subject="s", ttl_s=30)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="cargotrack")
    assert claims["exp"] - claims["iat"] == 30
    assert verify_token(token, SETTINGS).role is Role.OPS


def test_a_token_signed_with_another_key_is_refused() -> None:
    other_key = "another-key-entirely-0123456789abc"
    token = mint_token(other_key, role=Role.OPS, tenant_id="t", subject="s")
    with pytest.raises(AuthError, match="invalid token"):
        verify_token(token, SETTINGS)


def test_a_tampered_token_is_refused() -> None:
    token = mint_token(SECRET, role=Role.SHIPPER, tenant_id="t", subject="s")
    header, _payload, signature = token.split(".")
    forged_payload = signed({"role": "ops"}).split(".")[1]
    with pytest.raises(AuthError):
        verify_token(f"{header}.{forged_payload}.{signature}", SETTINGS)


def test_an_unsigned_token_is_refused() -> None:
    unsigned = jwt.encode(
        {
            "sub": "s",
            "tenant": "t",
            "role": "ops",
            "iss": "cargotrack",
            "aud": "cargotrack",
            "exp": int(time.time()) + 60,
        },
        key=None,
        algorithm="none",
    )
    with pytest.raises(AuthError):
        verify_token(unsigned, SETTINGS)


def test_another_algorithm_than_configured_is_refused() -> None:
    with pytest.raises(AuthError):
        verify_token(signed({}, algorithm="HS512"), SETTINGS)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "someone-else"}, "(?i)audience"),
        ({"iss": "someone-else"}, "issuer"),
        ({"exp": None}, "exp"),
        ({"sub": None}, "sub"),
        ({"role": "admin"}, "unknown role"),
        ({"role": None}, "unknown role"),
        ({"tenant": None}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"role": "driver"}, "vehicle_id"),
        ({"role": "customer"}, "customer_id"),
    ],
    ids=[
        "audience",
        "issuer",
        "no-exp",
        "no-sub",
        "unknown-role",
        "no-role",
        "no-tenant",
        "empty-tenant",
        "driver-without-vehicle",
        "customer-without-customer",
    ],
)
def test_a_token_without_the_right_claims_is_refused(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        verify_token(signed(claims), SETTINGS)


def test_issuer_and_audience_come_from_the_settings() -> None:
    settings = AuthSettings(jwt_secret=SECRET, issuer="idp", audience="tracking")
    token = mint_token(
        SECRET, role=Role.OPS, tenant_id="t", subject="s", issuer="idp", audience="tracking"
    )
    assert verify_token(token, settings).tenant_id == "t"
    with pytest.raises(AuthError):
        verify_token(mint_token(SECRET, role=Role.OPS, tenant_id="t", subject="s"), settings)


def test_minting_refuses_a_driver_without_vehicle_or_a_customer_without_id() -> None:
    with pytest.raises(ValueError, match="vehicle"):
        mint_token(SECRET, role=Role.DRIVER, tenant_id="t", subject="s")
    with pytest.raises(ValueError, match="customer"):
        mint_token(SECRET, role=Role.CUSTOMER, tenant_id="t", subject="s")


def test_role_claims_are_carried_only_when_given() -> None:
    token = mint_token(SECRET, role=Role.DRIVER, tenant_id="t", subject="s", vehicle_id="v")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="cargotrack")
    assert claims["role"] == "driver"
    assert claims["vehicle_id"] == "v"
    assert "customer_id" not in claims


def test_asymmetric_keys_select_asymmetric_algorithms() -> None:
    assert AuthSettings(jwt_secret=SECRET).algorithms == ["HS256"]
    assert AuthSettings(jwt_public_key="-----BEGIN PUBLIC KEY-----").algorithms == [
        "RS256",
        "ES256",
    ]


def test_there_is_no_principal_outside_an_authenticated_call() -> None:
    with pytest.raises(RuntimeError, match="no authenticated principal"):
        current_principal()


# --- the verified-token cache -------------------------------------------------------------


class Clock:
    """A settable clock for VerifiedTokens."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens whose signature and claims were verified (PyJWT), in order."""
    seen: list[str] = []
    real = auth._verify

    def spy(token: str, settings: AuthSettings, keys: Any = None) -> Any:
        seen.append(token)
        return real(token, settings, keys)

    monkeypatch.setattr(auth, "_verify", spy)
    return seen


def test_a_remembered_token_is_not_verified_again(verifications: list[str]) -> None:
    tokens = VerifiedTokens(SETTINGS)
    token = mint_token(SECRET, role=Role.CUSTOMER, tenant_id="t", subject="s", customer_id="c")
    first = tokens.verify(token)
    assert first == verify_token(token, SETTINGS)
    verifications.clear()
    for _ in range(5):
        assert tokens.verify(token) == first
    assert verifications == []


def test_a_remembered_token_expires_with_the_same_reason(verifications: list[str]) -> None:
    clock = Clock()
    exp = int(clock.now) + 60
    tokens = VerifiedTokens(SETTINGS, clock=clock)
    token = signed({"exp": exp})
    tokens.verify(token)
    clock.now = exp - 0.5
    tokens.verify(token)  # still valid, from memory
    assert verifications == [token]
    clock.now = exp  # PyJWT refuses exp <= now
    with pytest.raises(AuthError) as remembered:
        tokens.verify(token)
    expired = mint_token(SECRET, role=Role.OPS, tenant_id="t", subject="s", ttl_s=-1)
    with pytest.raises(AuthError) as fresh:
        verify_token(expired, SETTINGS)
    assert str(remembered.value) == str(fresh.value) == "invalid token: Signature has expired"
    assert len(tokens) == 0  # forgotten: a later use is verified afresh (and refused)
    assert verifications == [token, expired]


def test_a_remembered_token_before_its_iat_or_nbf_is_refused_as_pyjwt_does() -> None:
    clock = Clock()
    now = int(clock.now)
    tokens = VerifiedTokens(SETTINGS, clock=clock)
    issued = signed({"iat": now - 10})
    starting = signed({"iat": now - 100, "nbf": now - 10})
    tokens.verify(issued)
    tokens.verify(starting)
    clock.now = now - 20  # the clock stepped back
    for token, claim, future in [
        (issued, "iat", {"iat": now + 3600}),
        (starting, "nbf", {"nbf": now + 3600}),
    ]:
        with pytest.raises(AuthError) as remembered:
            tokens.verify(token)
        with pytest.raises(AuthError) as fresh:
            verify_token(signed(future), SETTINGS)
        assert str(remembered.value) == str(fresh.value)
        assert f"({claim})" in str(remembered.value)


def test_failures_are_never_remembered(verifications: list[str]) -> None:
    tokens = VerifiedTokens(SETTINGS)
    bad = mint_token(
        "another-key-entirely-0123456789abc", role=Role.OPS, tenant_id="t", subject="s"
    )
    for _ in range(3):
        with pytest.raises(AuthError, match="invalid token"):
            tokens.verify(bad)
    assert verifications == [bad] * 3
    assert len(tokens) == 0


def test_a_token_differing_in_one_byte_is_verified_afresh(verifications: list[str]) -> None:
    tokens = VerifiedTokens(SETTINGS)
    token = mint_token(SECRET, role=Role.SHIPPER, tenant_id="t", subject="s")
    tokens.verify(token)
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged_signature = f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    forged_claims = f"{header}.{signed({'role': 'ops'}).split('.')[1]}.{signature}"
    for forged in (forged_signature, forged_claims):
        with pytest.raises(AuthError):
            tokens.verify(forged)
    assert verifications == [token, forged_signature, forged_claims]
    assert tokens.verify(token).role is Role.SHIPPER
    assert len(verifications) == 3


def test_the_cache_is_bounded_and_keeps_the_recently_used(verifications: list[str]) -> None:
    tokens = VerifiedTokens(SETTINGS, max_entries=3)
    minted = [mint_token(SECRET, role=Role.OPS, tenant_id="t", subject=f"s{i}") for i in range(10)]
    for token in minted:
        tokens.verify(token)
        tokens.verify(minted[0])  # kept in use: never the least recently used
    assert len(tokens) == 3
    verifications.clear()
    tokens.verify(minted[0])
    tokens.verify(minted[-1])
    assert verifications == []
    tokens.verify(minted[1])  # evicted long ago
    assert verifications == [minted[1]]
    assert len(tokens) == 3
    with pytest.raises(ValueError, match="max_entries"):
        VerifiedTokens(SETTINGS, max_entries=0)


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.aio.ServicerContext the interceptor's abort handler uses."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted


async def _call(interceptor: AuthInterceptor, method: str, token: str) -> tuple[Any, _Context]:
    """Run one unary call through the interceptor: (the servicer's answer, the context)."""

    async def behaviour(request: object, context: object) -> str:
        return current_principal().subject

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(behaviour)

    details = SimpleNamespace(
        method=method, invocation_metadata=(("authorization", f"Bearer {token}"),)
    )
    handler = await interceptor.intercept_service(continuation, details)
    context = _Context()
    try:
        return await handler.unary_unary(object(), context), context
    except _Aborted:
        return None, context


async def test_the_interceptor_refuses_a_remembered_expired_token_as_a_fresh_one() -> None:
    method = "/cargotrack.v1.X/Read"
    clock = Clock()
    interceptor = AuthInterceptor(
        SETTINGS, {method: {Role.OPS}}, tokens=VerifiedTokens(SETTINGS, clock=clock)
    )
    token = signed({"exp": int(clock.now) + 60, "sub": "reader"})
    answer, context = await _call(interceptor, method, token)
    assert (answer, context.status) == ("reader", None)
    clock.now += 120
    _answer, remembered = await _call(interceptor, method, token)
    expired = mint_token(SECRET, role=Role.OPS, tenant_id="t", subject="s", ttl_s=-1)
    _answer, fresh = await _call(interceptor, method, expired)
    assert remembered.status == fresh.status
    assert fresh.status == (grpc.StatusCode.UNAUTHENTICATED, "invalid token: Signature has expired")


@pytest.mark.parametrize(
    "claims",
    [
        {"role": "customer", "customer_id": 42},
        {"role": "customer", "customer_id": ["c"]},
        {"role": "customer", "customer_id": "c\x00"},
        {"role": "customer", "customer_id": "c\ud800"},
        {"role": "customer", "customer_id": "with space"},
        {"role": "customer", "customer_id": "c" * 129},
        {"role": "driver", "vehicle_id": {"v": 1}},
        {"role": "ops", "vehicle_id": 7},
        {"tenant": 7},
        {"tenant": "t\x00"},
        {"role": ["ops"]},
        {"sub": "s" * 257},
        {"sub": "tab\there"},
        {"exp": 10**400},
    ],
    ids=repr,
)
def test_claims_of_the_wrong_type_or_shape_are_refused(claims: dict[str, Any]) -> None:
    """Issue 12, finding 5: these used to pass and fail later, in a query, as INTERNAL."""
    base: dict[str, Any] = {"role": "ops", "tenant": "t"}
    with pytest.raises(AuthError, match="invalid token"):
        verify_token(signed({**base, **claims}), SETTINGS)


def test_a_subject_may_hold_spaces_and_be_longer_than_an_id() -> None:
    principal = verify_token(
        signed({"role": "ops", "tenant": "t", "sub": "Jane Doe " + "x" * 200}), SETTINGS
    )
    assert principal.subject.startswith("Jane Doe")
    assert principal.expires_at is not None
