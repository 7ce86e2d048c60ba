"""DATABASE_URL: one host or several (a primary and its standbys), checked at start-up."""

from __future__ import annotations

import pytest

from shared.config import (
    ConfigError,
    database_hosts,
    database_url_problems,
    load_settings,
    with_password,
)
from shared.db import CONNECTION_ERRORS, NOT_ANSWERING

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
}
MULTI = "postgresql://app@db1:5432,db2:5433/cargotrack?target_session_attrs=read-write"


def test_a_multi_host_url_is_accepted_unchanged() -> None:
    settings = load_settings({**BASE, "DATABASE_URL": MULTI})
    assert settings.database.url == MULTI
    assert database_hosts(MULTI) == [("db1", 5432), ("db2", 5433)]


def test_the_password_goes_to_the_user_of_a_multi_host_url() -> None:
    url = load_settings(
        {**BASE, "DATABASE_URL": MULTI, "CARGOTRACK_DB_PASSWORD": "p@ss:word"}
    ).database.url
    assert url == (
        "postgresql://app:p%40ss%3Aword@db1:5432,db2:5433/cargotrack"
        "?target_session_attrs=read-write"
    )
    assert database_hosts(url) == [("db1", 5432), ("db2", 5433)]
    assert with_password("postgresql://app@[::1]:5432,db2/x", "s") == (
        "postgresql://app:s@[::1]:5432,db2/x"
    )


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://u@db/x", [("db", None)]),
        ("postgres://u:p@127.0.0.1:15432/postgres", [("127.0.0.1", 15432)]),
        (
            "postgresql://u@[::1]:5432,[fe80::1]/x?target_session_attrs=primary",
            [("::1", 5432), ("fe80::1", None)],
        ),
        ("postgresql:///x?host=/run/postgresql", [("/run/postgresql", None)]),
        ("postgresql:///x", [("", None)]),
        (
            "postgresql://cargotrack_query@cargotrack-pg-rw:5432/cargotrack"
            "?sslmode=verify-full&sslrootcert=/etc/cargotrack/pg-ca/ca.crt",
            [("cargotrack-pg-rw", 5432)],
        ),
    ],
)
def test_hosts_are_read_as_libpq_reads_them(url: str, hosts: list[tuple[str, int | None]]) -> None:
    assert database_hosts(url) == hosts
    assert database_url_problems(url) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://u@db/x", "expected a postgresql:// URL"),
        ("postgresql://u@db1:5432,db2:5433/x", "names 2 hosts but not target_session_attrs"),
        (
            "postgresql://u@db1,db2/x?target_session_attrs=any",
            "names 2 hosts but not target_session_attrs",
        ),
        ("postgresql://u@db:5432/x?target_session_attrs=writable", "target_session_attrs="),
        ("postgresql://u@db:99999/x", "port '99999' of host 'db' is not a TCP port"),
        ("postgresql://u@db:abc/x", "port 'abc'"),
        ("postgresql://u@db1,,db2/x?target_session_attrs=read-write", "empty host"),
        ("postgresql://u@[::1]x:5432/x", "malformed IPv6 host"),
        ("postgresql://u:p@ss@db/x", "'@' in the user or password must be percent-encoded"),
        ("postgresql://u@db/x?sslmode", "bad query field"),
    ],
)
def test_a_malformed_url_is_refused_with_the_reason(url: str, problem: str) -> None:
    (found,) = database_url_problems(url)
    assert problem in found
    with pytest.raises(ConfigError, match="DATABASE_URL: "):
        load_settings({**BASE, "DATABASE_URL": url})


@pytest.mark.parametrize("attrs", ["read-write", "primary"])
def test_several_hosts_need_an_attribute_that_finds_the_primary(attrs: str) -> None:
    url = f"postgresql://u@db1,db2,db3/x?target_session_attrs={attrs}"
    assert database_url_problems(url) == []
    assert len(database_hosts(url)) == 3


def test_no_writable_host_yet_is_a_connection_error_not_a_bug() -> None:
    """While a standby is promoted, asyncpg finds no host accepting writes: services
    answer UNAVAILABLE and start-up waits, as for a refused connection."""
    import asyncpg

    not_matched = asyncpg.exceptions.TargetServerAttributeNotMatched("none")
    assert isinstance(not_matched, CONNECTION_ERRORS)
    assert isinstance(not_matched, NOT_ANSWERING)
