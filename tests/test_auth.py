"""The request authenticator on its own: header parsing, outcomes, cache, slow-down, permissions."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from tabserve.errors import Forbidden, NotAcceptable, Unauthorized
from tabserve.server.auth import (
    ANONYMOUS,
    Authenticator,
    BadHeader,
    is_connection_test,
    parse_basic,
)
from tabserve.server.credentials import CredentialCache, FailureThrottle, User
from tabserve.store.passwords import PasswordEntry, hash_password, verify

FIXTURE = Path(__file__).parent / "fixtures" / "tabpy_passwords.txt"


def basic(user: str, password: str, scheme: str = "Basic") -> str:
    return f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_users(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


class CountingVerifier:
    """The real verify, counting how often the expensive hash runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, entry: PasswordEntry, password: str) -> bool:
        with self.lock:
            self.calls += 1
        return verify(entry, password)


def authenticator(path: Path, **kwargs: object) -> tuple[Authenticator, CountingVerifier]:
    counter = CountingVerifier()
    cache = CredentialCache(path, verifier=counter)
    return Authenticator(cache, realm="Test Realm", **kwargs), counter  # type: ignore[arg-type]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- header parsing (RFC 7617) --------------------------------------------------------------


def test_split_at_first_colon_so_passwords_may_contain_colons() -> None:
    credentials = parse_basic(basic("alice", "a:b::c:"))
    assert (credentials.username, credentials.password) == ("alice", "a:b::c:")


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    assert parse_basic(basic("u", "p", scheme)).username == "u"


def test_extra_spaces_and_missing_padding_are_tolerated() -> None:
    token = base64.b64encode(b"ab:c").decode().rstrip("=")
    assert parse_basic(f"  Basic    {token}  ").password == "c"


def test_utf8_credentials() -> None:
    credentials = parse_basic(basic("jörg", "päss wört"))
    assert (credentials.username, credentials.password) == ("jörg", "päss wört")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer abc.def", "unsupported scheme 'Bearer'"),
        ("Basic", "without credentials"),
        ("Basic !!!notbase64", "not valid base64"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), "no ':'"),
        ("Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "not UTF-8"),
    ],
)
def test_bad_headers_say_why(header: str, reason: str) -> None:
    with pytest.raises(BadHeader, match=reason):
        parse_basic(header)


def test_credentials_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(parse_basic(basic("u", "s3cret")))


# --- outcomes ---------------------------------------------------------------------------------


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write_users(
        tmp_path / "passwords.txt",
        "# users",
        f"alice {hash_password('alice', 'wonder:land', 'tabpy')}",
        f"bob {hash_password('bob', 'builder')} query",
    )


def test_valid_credentials_give_the_user(users: Path) -> None:
    auth, _ = authenticator(users)
    user = run(auth.authenticate(basic("ALICE", "wonder:land"), "10.0.0.1"))
    assert user == User("alice", frozenset({"evaluate", "query", "manage"}))
    bob = run(auth.authenticate(basic("bob", "builder"), "10.0.0.1"))
    assert bob == User("bob", frozenset({"query"}))


def test_tabpy_made_password_file_works_unchanged() -> None:
    auth, _ = authenticator(FIXTURE)
    assert run(auth.authenticate(basic("user1", "P@ssw0rd"), "h")).name == "user1"  # type: ignore[attr-defined]
    with pytest.raises(Unauthorized):
        run(auth.authenticate(basic("user1", "p@ssw0rd"), "h"))


@pytest.mark.parametrize(
    ("header", "logged"),
    [
        (None, "no Authorization header"),
        ("Bearer token-value-123", "unsupported scheme 'Bearer'"),
        ("Basic %%%", "not valid base64"),
        (basic("mallory", "guess-one"), "unknown user 'mallory'"),
        (basic("alice", "guess-two"), "wrong password for user 'alice'"),
    ],
)
def test_failures_are_401_with_the_reason_logged_and_no_secret(
    users: Path, header: str | None, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    auth, _ = authenticator(users)
    with caplog.at_level(logging.INFO, logger="tabserve"):
        with pytest.raises(Unauthorized) as caught:
            run(auth.authenticate(header, "192.0.2.7"))
    error = caught.value
    assert error.envelope() == {
        "message": "Invalid credentials provided.",
        "info": "Unauthorized request.",
    }
    assert error.headers() == {"WWW-Authenticate": 'Basic realm="Test Realm"'}
    assert logged in caplog.text and "192.0.2.7" in caplog.text
    for secret in ("guess-one", "guess-two", "token-value-123", "wonder:land"):
        assert secret not in caplog.text


def test_realm_is_quoted_safely() -> None:
    error = Unauthorized(realm='My "Big" \\ Server\n')
    assert error.headers()["WWW-Authenticate"] == 'Basic realm="My \\"Big\\" \\\\ Server "'


def test_auth_off_refuses_parseable_credentials_with_406() -> None:
    auth = Authenticator(None, realm="R")
    with pytest.raises(NotAcceptable) as caught:
        run(auth.authenticate(basic("user1", "x"), "h"))
    assert caught.value.status == 406
    assert caught.value.envelope() == {
        "message": "Username or password provided when authentication not available.",
        "info": "Not Acceptable",
    }
    assert caught.value.headers() == {"WWW-Authenticate": 'Basic realm="R"'}


@pytest.mark.parametrize("header", [None, "Bearer xyz", "Basic !!!", "garbage"])
def test_auth_off_lets_absent_or_unparseable_headers_through(header: str | None) -> None:
    assert run(Authenticator(None, realm="R").authenticate(header, "h")) is ANONYMOUS


# --- cost: the hash runs once per credential, off the event loop ---------------------------


def test_hash_runs_once_then_the_cache_answers_cheaply(users: Path) -> None:
    auth, counter = authenticator(users)
    header = basic("alice", "wonder:land")

    async def many() -> float:
        await auth.authenticate(header, "h")
        started = time.perf_counter()
        for _ in range(2000):
            await auth.authenticate(header, "h")
        return (time.perf_counter() - started) / 2000

    per_request = run(many())
    assert counter.calls == 1
    # A cache hit is tens of microseconds; a hash is milliseconds. A very wide margin.
    assert per_request < 0.001  # type: ignore[operator]


def test_failures_are_never_cached(users: Path) -> None:
    auth, counter = authenticator(users)
    for _ in range(3):
        with pytest.raises(Unauthorized):
            run(auth.authenticate(basic("alice", "nope"), "h"))
    assert counter.calls == 3


def test_cache_miss_is_hashed_off_the_event_loop(users: Path) -> None:
    loop_threads: set[int] = set()
    hash_threads: set[int] = set()

    def recording_verify(entry: PasswordEntry, password: str) -> bool:
        hash_threads.add(threading.get_ident())
        return verify(entry, password)

    auth = Authenticator(CredentialCache(users, verifier=recording_verify), realm="R")

    async def check() -> None:
        loop_threads.add(threading.get_ident())
        await auth.authenticate(basic("bob", "builder"), "h")

    run(check())
    auth.close()
    assert hash_threads and not hash_threads & loop_threads


def test_identical_concurrent_misses_share_one_hash(users: Path) -> None:
    auth, counter = authenticator(users)
    header = basic("bob", "builder")

    async def burst() -> list[object]:
        return await asyncio.gather(*(auth.authenticate(header, "h") for _ in range(20)))

    results = run(burst())
    assert {user.name for user in results} == {"bob"}  # type: ignore[attr-defined]
    assert counter.calls == 1


def test_changed_password_file_takes_effect_without_restart(users: Path) -> None:
    auth = Authenticator(CredentialCache(users, recheck_interval=0.0), realm="R")
    run(auth.authenticate(basic("bob", "builder"), "h"))
    write_users(users, f"bob {hash_password('bob', 'rebuilt')} query")
    with pytest.raises(Unauthorized):
        run(auth.authenticate(basic("bob", "builder"), "h"))
    assert run(auth.authenticate(basic("bob", "rebuilt"), "h")).name == "bob"  # type: ignore[attr-defined]


def test_reload_forces_a_reread(users: Path) -> None:
    # A long recheck interval: only the forced reload (SIGHUP) can see the change.
    auth = Authenticator(CredentialCache(users, recheck_interval=3600), realm="R")
    assert auth.user_count == 2
    write_users(users, f"carol {hash_password('carol', 'pw', 'tabpy')}")
    assert auth.reload() is True
    assert auth.user_count == 1
    assert run(auth.authenticate(basic("carol", "pw"), "h")).name == "carol"  # type: ignore[attr-defined]


# --- slow-down of repeated failures ------------------------------------------------------------


def test_repeated_failures_delay_only_the_401(users: Path) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    throttle = FailureThrottle(threshold=3, base_delay=0.5, max_delay=4.0)
    auth, _ = authenticator(users, throttle=throttle, sleep=fake_sleep)
    for _ in range(6):
        with pytest.raises(Unauthorized):
            run(auth.authenticate(basic("alice", "wrong"), "203.0.113.9"))
    assert slept == [0.5, 1.0, 2.0, 4.0]
    # Valid credentials from the same, throttled address are answered without delay.
    run(auth.authenticate(basic("alice", "wonder:land"), "203.0.113.9"))
    assert len(slept) == 4
    # Another address is not affected.
    with pytest.raises(Unauthorized):
        run(auth.authenticate(basic("alice", "wrong"), "203.0.113.10"))
    assert len(slept) == 4


def test_from_file_without_delay_has_no_throttle(users: Path) -> None:
    assert Authenticator.from_file(users, realm="R", max_delay=0).throttle is None
    throttle = Authenticator.from_file(users, realm="R", max_delay=0.2).throttle
    assert throttle is not None and throttle.max_delay == 0.2
    assert not Authenticator.from_file(None, realm="R", max_delay=10).enabled


# --- permissions ---------------------------------------------------------------------------------


def test_authorize() -> None:
    auth = Authenticator(None, realm="R")
    auth.authorize(ANONYMOUS, "manage")
    bob = User("bob", frozenset({"query"}))
    auth.authorize(bob, None)
    auth.authorize(bob, "query")
    with pytest.raises(Forbidden) as caught:
        auth.authorize(bob, "evaluate")
    assert caught.value.status == 403
    assert caught.value.envelope() == {
        "message": "User 'bob' is not allowed to run ad-hoc scripts (/evaluate).",
        "info": "This needs the 'evaluate' permission; the password file grants this user: query.",
    }


def test_connection_test_is_recognised() -> None:
    test_body = json.dumps({"script": "return int(1)", "data": {"_arg1": [4]}}).encode()
    assert is_connection_test(test_body)
    assert is_connection_test(gzip.compress(test_body), "gzip")
    assert not is_connection_test(test_body, "br")
    assert not is_connection_test(b'{"script": "return int(1) + 1", "data": {}}')
    assert not is_connection_test(b"not json")
    assert not is_connection_test(b'["return int(1)"]')
    padded = json.dumps({"script": "return int(1)", "data": {"_arg1": [0] * 1000}}).encode()
    assert not is_connection_test(padded)


# --- startup warning ------------------------------------------------------------------------------


def test_exposed_bind_without_auth_gets_a_loud_warning(users: Path) -> None:
    from tabserve.config import load_settings
    from tabserve.server.app import exposure_warning

    exposed = exposure_warning(load_settings(None, {"TABSERVE_BIND_ADDRESS": "0.0.0.0"}))
    assert exposed is not None and exposed.startswith("SECURITY WARNING")
    assert "TABPY_PWD_FILE" in exposed
    assert exposure_warning(load_settings(None, {})) is None
    protected = {"TABSERVE_BIND_ADDRESS": "0.0.0.0", "TABPY_PWD_FILE": str(users)}
    assert exposure_warning(load_settings(None, protected)) is None
