"""Verification keys (issue 12, finding 7): JWKS by kid and rotation, minimum secret
length, maximum token lifetime, the production guard, and the limit settings."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest

from shared.auth import AuthError, KeyRing, Role, VerifiedTokens, mint_token, verify_token
from shared.config import DEV_JWT_SECRET, AuthSettings, ConfigError, load_settings
from shared.rpc import server_options

OLD_KEY = "old-signing-key-" + "a" * 32
NEW_KEY = "new-signing-key-" + "b" * 32
BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://u:p@127.0.0.1:5432/db",
}


def jwk(kid: str, secret: str) -> dict[str, str]:
    encoded = base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()
    return {"kty": "oct", "kid": kid, "alg": "HS256", "k": encoded}


def write_jwks(path: Path, **keys: str) -> None:
    path.write_text(json.dumps({"keys": [jwk(kid, secret) for kid, secret in keys.items()]}))


def token(secret: str, kid: str | None, ttl_s: int = 600) -> str:
    return mint_token(
        secret, role=Role.OPS, tenant_id="tenant-a", subject="ops@a", ttl_s=ttl_s, kid=kid
    )


async def test_rotation_overlap_then_removal(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, old=OLD_KEY)
    settings = AuthSettings(jwks_file=str(jwks))
    keys = KeyRing(settings)
    tokens = VerifiedTokens(settings, keys=keys)
    old_token = token(OLD_KEY, "old")
    assert tokens.verify(old_token).subject == "ops@a"

    # Overlap: both keys published; tokens of either kid verify.
    write_jwks(jwks, old=OLD_KEY, new=NEW_KEY)
    assert await keys.refresh()
    new_token = token(NEW_KEY, "new")
    assert tokens.verify(old_token).subject == "ops@a"
    assert tokens.verify(new_token).subject == "ops@a"

    # The old key is removed: its tokens are refused, even the remembered one.
    write_jwks(jwks, new=NEW_KEY)
    assert await keys.refresh()
    with pytest.raises(AuthError, match="unknown kid 'old'"):
        tokens.verify(old_token)
    assert tokens.verify(new_token).subject == "ops@a"
    assert not await keys.refresh(), "an unchanged set is not a change"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_kid_selects_the_key_and_its_algorithm(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, old=OLD_KEY, new=NEW_KEY)
    settings = AuthSettings(jwks_file=str(jwks))
    with pytest.raises(AuthError, match="no kid"):
        verify_token(token(OLD_KEY, None), settings)
    with pytest.raises(AuthError, match="unknown kid"):
        verify_token(token(OLD_KEY, "other"), settings)
    # Signed with the old key but naming the new one: the signature does not match.
    with pytest.raises(AuthError, match="Signature verification failed"):
        verify_token(token(OLD_KEY, "new"), settings)
    # The key's algorithm only: an HS512 token under an HS256 key is refused.
    claims: dict[str, object] = {
        "sub": "x",
        "tenant": "t",
        "role": "ops",
        "iss": "cargotrack",
        "aud": "cargotrack",
    }
    claims["exp"] = int(time.time()) + 60
    hs512 = jwt.encode(claims, OLD_KEY, algorithm="HS512", headers={"kid": "old"})
    with pytest.raises(AuthError, match="alg value is not allowed"):
        verify_token(hs512, settings)


def test_a_short_hmac_key_in_the_jwks_is_refused(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, short="only-16-bytes-xx")
    with pytest.raises(ValueError, match="at least 32"):
        KeyRing(AuthSettings(jwks_file=str(jwks)))


async def test_a_broken_reload_keeps_the_previous_keys(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, old=OLD_KEY)
    keys = KeyRing(AuthSettings(jwks_file=str(jwks)))
    jwks.write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        await keys.refresh()
    assert keys.key_ids() == ["old"]


def test_static_secret_mode_ignores_kid() -> None:
    settings = AuthSettings(jwt_secret=OLD_KEY)
    assert verify_token(token(OLD_KEY, "anything"), settings).role is Role.OPS


def test_token_lifetime_is_bounded() -> None:
    settings = AuthSettings(jwt_secret=OLD_KEY, max_token_lifetime_s=3600)
    assert verify_token(token(OLD_KEY, None, ttl_s=3600), settings).role is Role.OPS
    with pytest.raises(AuthError, match="CARGOTRACK_JWT_MAX_LIFETIME_S"):
        verify_token(token(OLD_KEY, None, ttl_s=3601), settings)
    # Without iat, the lifetime counts from now.
    claims: dict[str, object] = {
        "sub": "x",
        "tenant": "t",
        "role": "ops",
        "iss": "cargotrack",
        "aud": "cargotrack",
    }
    claims["exp"] = int(time.time()) + 7200
    with pytest.raises(AuthError, match="more than the 3600s"):
        verify_token(jwt.encode(claims, OLD_KEY, algorithm="HS256"), settings)


def test_a_short_hs256_secret_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="CARGOTRACK_JWT_SECRET: 31 bytes"):
        load_settings(BASE | {"CARGOTRACK_JWT_SECRET": "x" * 31})
    assert load_settings(BASE | {"CARGOTRACK_JWT_SECRET": "x" * 32}).auth.jwt_secret


def test_jwks_settings() -> None:
    settings = load_settings(
        BASE
        | {"CARGOTRACK_JWKS_URL": "https://idp.example/jwks", "CARGOTRACK_JWKS_REFRESH_S": "60"}
    )
    assert settings.auth.jwks_url == "https://idp.example/jwks"
    assert settings.auth.jwks_refresh_s == 60
    with pytest.raises(ConfigError, match="must not be set"):
        load_settings(BASE | {"CARGOTRACK_JWKS_FILE": "/k.json", "CARGOTRACK_JWT_SECRET": OLD_KEY})
    with pytest.raises(ConfigError, match="set one, not both"):
        load_settings(
            BASE | {"CARGOTRACK_JWKS_FILE": "/k.json", "CARGOTRACK_JWKS_URL": "https://i/j"}
        )


def test_production_guard_refuses_development_configuration() -> None:
    with pytest.raises(ConfigError, match="cannot run as production"):
        load_settings(BASE | {"CARGOTRACK_DEV_MODE": "1", "CARGOTRACK_PRODUCTION": "1"})
    with pytest.raises(ConfigError, match="refused in production"):
        load_settings(
            BASE | {"CARGOTRACK_JWT_SECRET": DEV_JWT_SECRET, "CARGOTRACK_PRODUCTION": "1"}
        )
    assert load_settings(BASE | {"CARGOTRACK_JWT_SECRET": OLD_KEY, "CARGOTRACK_PRODUCTION": "1"})


def test_limit_settings() -> None:
    settings = load_settings(
        BASE
        | {
            "CARGOTRACK_JWT_SECRET": OLD_KEY,
            "CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL": "3",
            "CARGOTRACK_GRPC_MAX_CONNECTION_AGE_S": "90",
            "CARGOTRACK_GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS": "0",
        }
    )
    limits = settings.grpc.limits
    assert (limits.max_streams_per_principal, limits.max_connection_age_s) == (3, 90.0)
    assert limits.keepalive_permit_without_calls is False
    with pytest.raises(ConfigError, match="CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS=0"):
        load_settings(
            BASE
            | {"CARGOTRACK_JWT_SECRET": OLD_KEY, "CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS": "0"}
        )


def test_database_password_comes_apart_from_the_url() -> None:
    url = "postgresql://cargotrack_query@db:5432/cargotrack?sslmode=verify-full&sslrootcert=/ca.crt"
    settings = load_settings(
        BASE
        | {
            "DATABASE_URL": url,
            "CARGOTRACK_DB_PASSWORD": "p@ss/w:rd",
            "CARGOTRACK_JWT_SECRET": OLD_KEY,
        }
    )
    assert settings.database.url == (
        "postgresql://cargotrack_query:p%40ss%2Fw%3Ard@db:5432/cargotrack"
        "?sslmode=verify-full&sslrootcert=/ca.crt"
    )
    with pytest.raises(ConfigError, match="CARGOTRACK_DB_PASSWORD: DATABASE_URL already"):
        load_settings(
            BASE
            | {
                "DATABASE_URL": "postgresql://u:p@db/x",
                "CARGOTRACK_DB_PASSWORD": "x",
                "CARGOTRACK_JWT_SECRET": OLD_KEY,
            }
        )


def test_a_jwks_without_a_usable_key_is_refused(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    key = jwk("weird", OLD_KEY) | {"alg": "HS1"}
    jwks.write_text(json.dumps({"keys": [key]}))
    with pytest.raises(ValueError, match="unusable JWKS"):
        KeyRing(AuthSettings(jwks_file=str(jwks)))


def test_server_options_carry_every_limit() -> None:
    settings = load_settings(
        BASE
        | {
            "CARGOTRACK_JWT_SECRET": OLD_KEY,
            "CARGOTRACK_GRPC_MAX_CONCURRENT_STREAMS": "7",
            "CARGOTRACK_GRPC_KEEPALIVE_TIME_S": "30",
            "CARGOTRACK_GRPC_KEEPALIVE_TIMEOUT_S": "5",
            "CARGOTRACK_GRPC_MIN_PING_INTERVAL_S": "15",
            "CARGOTRACK_GRPC_MAX_CONNECTION_AGE_S": "600",
            "CARGOTRACK_GRPC_MAX_CONNECTION_AGE_GRACE_S": "45",
        }
    )
    options = dict(server_options(settings.grpc))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 45_000
