"""Bearer tokens: minting, verification, expiry, keys, and the claims each role needs."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from shared.auth import AuthError, Principal, Role, current_principal, mint_token, verify_token
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
