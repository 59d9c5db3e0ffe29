"""The server's authentication state on its own: the credential cache and the throttle."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from helpers import USER1_HASH, FakeClock, write
from tabserve.server.credentials import CredentialCache, FailureThrottle, User
from tabserve.store.passwords import (
    PasswordEntry,
    PasswordFileError,
    add_user,
    delete_user,
    hash_password,
    update_user,
    verify,
)


def test_a_user_can_what_its_permissions_say() -> None:
    user = User("alice", frozenset({"evaluate", "query"}))
    assert user.can("query") and not user.can("manage")


# --- credential cache -----------------------------------------------------------------------


class CountingVerifier:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, entry: PasswordEntry, password: str) -> bool:
        self.calls += 1
        return verify(entry, password)


def make_cache(tmp_path: Path, text: str) -> tuple[CredentialCache, CountingVerifier, FakeClock]:
    path = write(tmp_path / "pw.txt", text)
    counter, clock = CountingVerifier(), FakeClock()
    return CredentialCache(path, clock=clock, verifier=counter), counter, clock


def test_cache_hit_does_not_hash_again(tmp_path: Path) -> None:
    cache, counter, _ = make_cache(tmp_path, f"user1 {USER1_HASH} query\n")
    assert cache.cached("user1", "P@ssw0rd") is None
    user = cache.check("user1", "P@ssw0rd")
    assert user is not None and user.name == "user1" and user.permissions == {"query"}
    assert counter.calls == 1
    for _ in range(5):
        assert cache.check("USER1", "P@ssw0rd") == user
    assert cache.cached("user1", "P@ssw0rd") == user
    assert counter.calls == 1
    result = cache.authenticate("user1", "P@ssw0rd")
    assert result.ok and result.cached and result.reason == "ok"


def test_cache_never_caches_failures_or_holds_plaintext(tmp_path: Path) -> None:
    cache, counter, _ = make_cache(tmp_path, f"user1 {USER1_HASH}\n")
    assert cache.authenticate("user1", "wrong").reason == "wrong password"
    assert cache.check("user1", "wrong") is None
    assert counter.calls == 2
    assert cache.authenticate("nobody", "P@ssw0rd").reason == "unknown user"
    assert counter.calls == 3  # a dummy hash, so unknown names cost the same time
    assert cache.check("user1", "P@ssw0rd") is not None
    assert len(cache._hits) == 1
    for key, _user in cache._hits.items():
        assert b"P@ssw0rd" not in key


def test_cache_reloads_on_change(tmp_path: Path) -> None:
    cache, counter, clock = make_cache(tmp_path, f"user1 {USER1_HASH}\n")
    path = cache.path
    assert cache.check("user1", "P@ssw0rd") is not None
    update_user(path, "user1", "changed", scheme="tabpy")
    # Within the recheck interval the file is not even looked at.
    assert cache.check("user1", "P@ssw0rd") is not None
    clock.now += 1.5
    assert cache.check("user1", "P@ssw0rd") is None
    assert cache.check("user1", "changed") is not None
    calls = counter.calls
    clock.now += 1.5
    assert cache.check("user1", "changed") is not None  # unchanged file: still cached
    assert counter.calls == calls
    delete_user(path, "user1")
    add_user(path, "bob", "pw", scheme="tabpy")
    clock.now += 1.5
    assert cache.check("user1", "changed") is None
    assert set(cache.users) == {"bob"}


def test_cache_keeps_previous_users_when_reload_is_malformed(tmp_path: Path) -> None:
    cache, _, clock = make_cache(tmp_path, f"user1 {USER1_HASH}\n")
    write(cache.path, f"user1 {USER1_HASH}\nhalf-written\n")
    clock.now += 1.5
    assert cache.check("user1", "P@ssw0rd") is not None
    assert cache.last_error is not None and cache.last_error.line == 2
    write(cache.path, f"user1 {USER1_HASH}\nbob {USER1_HASH}\n")
    clock.now += 1.5
    assert cache.reload_if_changed()
    assert set(cache.users) == {"user1", "bob"}
    assert cache.last_error is None


def test_cache_refuses_bad_file_at_start(tmp_path: Path) -> None:
    path = write(tmp_path / "pw.txt", "# nobody\n")
    with pytest.raises(PasswordFileError, match="no users"):
        CredentialCache(path)


def test_cache_is_bounded(tmp_path: Path) -> None:
    path = write(tmp_path / "pw.txt", f"user1 {USER1_HASH}\n")
    cache = CredentialCache(path, max_entries=2, verifier=lambda entry, password: True)
    for index in range(5):
        assert cache.check("user1", f"pw{index}") is not None
    assert len(cache._hits) == 2


# --- failure throttle -----------------------------------------------------------------------


def test_throttle_grows_caps_and_forgets() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(threshold=3, window=60, base_delay=1, max_delay=5, clock=clock)
    delays = []
    for _ in range(7):
        delays.append(throttle.delay_for("10.0.0.1"))
        throttle.record_failure("10.0.0.1")
    assert delays == [0, 0, 0, 1, 2, 4, 5]
    assert throttle.delay_for("10.0.0.2") == 0  # per address
    clock.now += 61
    assert throttle.delay_for("10.0.0.1") == 0
    assert throttle.failures("10.0.0.1") == 0


def test_throttle_window_slides_and_reset() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(threshold=2, window=10, base_delay=1, max_delay=8, clock=clock)
    throttle.record_failure("a")
    clock.now += 6
    throttle.record_failure("a")
    assert throttle.delay_for("a") == 1
    clock.now += 5  # the first failure is now outside the window
    assert throttle.delay_for("a") == 0
    throttle.record_failure("a")
    assert throttle.delay_for("a") == 1
    throttle.reset("a")
    assert throttle.delay_for("a") == 0


def test_throttle_bounds_memory() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(threshold=1, max_clients=3, clock=clock)
    for index in range(10):
        throttle.record_failure(f"10.0.0.{index}")
    assert len(throttle._failures) == 3
    for _ in range(1000):
        throttle.record_failure("x")
    assert len(throttle._failures["x"]) < 20
    assert throttle.delay_for("x") == throttle.max_delay


def test_throttle_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FailureThrottle(threshold=0)


def test_cache_is_thread_safe(tmp_path: Path) -> None:
    cache, counter, _ = make_cache(tmp_path, f"user1 {USER1_HASH}\n")
    results: list[bool] = []

    def worker(password: str) -> None:
        for _ in range(20):
            results.append(cache.check("user1", password) is not None)

    threads = [
        threading.Thread(target=worker, args=("P@ssw0rd" if index % 2 else "wrong",))
        for index in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results.count(True) == 80 and results.count(False) == 80
    # Every wrong attempt hashed; the right one hashed at most once per racing thread.
    assert 80 < counter.calls <= 84


def test_unknown_user_costs_a_hash_of_the_files_own_scheme(tmp_path: Path) -> None:
    """Timing must not tell an unknown user from a wrong password: same scheme, same work."""
    path = tmp_path / "pw.txt"
    lines = [f"{name} {hash_password(name, 'pw', 'scrypt')}" for name in ("alice", "bob")]
    path.write_text("\n".join(lines) + "\n")
    schemes: list[str] = []

    def verifier(entry: PasswordEntry, password: str) -> bool:
        schemes.append(entry.scheme)
        return verify(entry, password)

    cache = CredentialCache(path, verifier=verifier)
    assert cache.check("mallory", "x") is None
    assert cache.check("alice", "wrong") is None
    assert schemes == ["scrypt", "scrypt"]
