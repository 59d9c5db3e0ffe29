"""What the server remembers about authentication while it runs: the ``User`` a request
runs as, the credential cache over the password file, and the failure throttle.

The password file itself (format, hashing, editing) is ``store.passwords``; ``auth`` uses
these to answer a request's ``Authorization`` header.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..store.passwords import (
    ALL_PERMISSIONS,
    PasswordEntry,
    PasswordFileError,
    hash_password,
    normalize_username,
    read_password_file,
    verify,
)

log = logging.getLogger("tabserve.passwords")  # the name these lines always had


@dataclass(frozen=True)
class User:
    """An authenticated user: what the server needs after a successful check.

    ``scopes`` is None for a password-file user; for a bearer token, its granted scopes
    (its permissions are then derived from them, see ``auth.Authenticator``). ``identity``
    is set for a token: whose it is, even when ``name`` is empty (TABPY_OAUTH_LOG_USER off).

    ``key_id`` is set when an API key authenticated the request. ``endpoint`` is set for an
    endpoint key: the one endpoint it may reach. Routes that do not allow endpoint keys
    refuse it in ``BaseHandler._authenticate``; jobs and results are shown to it only when
    ``jobs.can_see`` says so (its own, on its endpoint).
    """

    name: str
    permissions: frozenset[str] = ALL_PERMISSIONS
    scopes: frozenset[str] | None = None
    identity: str | None = None
    key_id: str | None = None
    endpoint: str | None = None

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def owner(self) -> str:
        """Whose per-user things (Flight tables) a request touches: the user's name, or a
        token's identity, so that tokens of different subjects never share."""
        return self.name if self.identity is None else self.identity


def _user(entry: PasswordEntry) -> User:
    return User(entry.username, entry.effective_permissions)


@dataclass(frozen=True)
class AuthResult:
    """Outcome of a credential check; ``reason`` is safe to log (it never holds a secret)."""

    user: User | None
    reason: str  # "ok", "unknown user", "wrong password"
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.user is not None


_FileSignature = tuple[int, int, int, int]


def _signature(path: Path) -> _FileSignature | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.cache
def _dummy_entry(scheme: str) -> PasswordEntry:
    """Verified against when the user name is unknown, so that a miss costs as much as a
    wrong password (the same scheme, the same work) and response time does not reveal which
    user names exist. Made once per scheme, with a password nobody knows."""
    return PasswordEntry("\0dummy", hash_password("\0dummy", secrets.token_hex(16), scheme))


class CredentialCache:
    """Answers Basic-auth checks, paying the hash cost once per distinct (user, password).

    Successful checks are remembered under an HMAC-SHA256 of (user, password) keyed with a
    per-process random key, so the memory holds no plaintext and nothing reusable elsewhere.
    Failures are never cached. The file is re-read when its inode, size or mtime changes
    (looked at no more than once per ``recheck_interval`` seconds); the cache is dropped on
    every reload so removed users and changed passwords stop working straight away.

    If a reload finds the file malformed or missing, the previous users stay in force and
    the error is logged (and kept in ``last_error``): a half-saved edit must not lock
    everyone out. Files written by ``tabserve user`` are replaced atomically, so this only
    matters for hand edits.

    Thread-safe: hashing happens outside the lock, so the server may call :meth:`check`
    from worker threads and :meth:`cached` (which never hashes) on the event loop.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        entries: dict[str, PasswordEntry] | None = None,
        recheck_interval: float = 1.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        verifier: Callable[[PasswordEntry, str], bool] = verify,
    ) -> None:
        # No path: the users come from a store, handed over with ``entries`` and
        # :meth:`replace` (the store's follower reloads them in a thread).
        self.path = Path(path) if path is not None else None
        self._recheck_interval = recheck_interval
        self._max_entries = max_entries
        self._clock = clock
        self._verify = verifier
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._hits: OrderedDict[bytes, User] = OrderedDict()
        self.last_error: PasswordFileError | None = None
        # Startup must fail loudly on a bad file, so the first read is allowed to raise.
        if self.path is None:
            self._entries = dict(entries or {})
            self._signature = None
        else:
            self._entries = read_password_file(self.path).users
            self._signature = _signature(self.path)
        self._next_check = clock() + recheck_interval

    @property
    def users(self) -> dict[str, User]:
        return {name: _user(entry) for name, entry in self._entries.items()}

    def user(self, name: str) -> User | None:
        """The user called ``name`` now (a user key acts as them), without any password."""
        self.reload_if_changed()
        entry = self._entries.get(normalize_username(name))
        return None if entry is None else _user(entry)

    def _key_for(self, username: str, password: str) -> bytes:
        name = username.encode("utf-8", "surrogatepass")
        secret = password.encode("utf-8", "surrogatepass")
        # Length prefix so ("ab", "c") and ("a", "bc") can never share a key.
        message = len(name).to_bytes(4, "big") + name + secret
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def replace(self, entries: dict[str, PasswordEntry]) -> bool:
        """Use ``entries`` from now on (users from a store); True when they differ."""
        with self._lock:
            if entries == self._entries:
                return False
            self._entries = dict(entries)
            self._hits.clear()  # removed users and changed passwords stop working at once
        log.info("Users reloaded from the store: %d user(s)", len(entries))
        return True

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed; return True when a new version was loaded."""
        if self.path is None:
            return False
        now = self._clock()
        with self._lock:
            if not force and now < self._next_check:
                return False
            self._next_check = now + self._recheck_interval
            signature = _signature(self.path)
            if not force and signature == self._signature:
                return False
            self._signature = signature
        try:
            new_file = read_password_file(self.path)
        except PasswordFileError as exc:
            self.last_error = exc
            log.error("Password file not reloaded, keeping the previous users: %s", exc)
            return False
        with self._lock:
            self._entries = new_file.users
            self._hits.clear()
            self.last_error = None
        log.info("Password file reloaded: %d user(s)", len(new_file))
        return True

    def cached(self, username: str, password: str) -> User | None:
        """The user if this exact pair already succeeded; None means "unknown, call check"."""
        self.reload_if_changed()
        key = self._key_for(normalize_username(username), password)
        with self._lock:
            user = self._hits.get(key)
            if user is not None:
                self._hits.move_to_end(key)
            return user

    def authenticate(self, username: str, password: str) -> AuthResult:
        """Full check with a loggable reason; may cost one hash (tens of milliseconds)."""
        self.reload_if_changed()
        name = normalize_username(username)
        key = self._key_for(name, password)
        with self._lock:
            user = self._hits.get(key)
            if user is not None:
                self._hits.move_to_end(key)
                return AuthResult(user, "ok", cached=True)
            entries = self._entries
        entry = entries.get(name)
        if entry is None:
            # The scheme most users in the file have: what a wrong password would cost.
            schemes = [e.scheme for e in entries.values()]
            scheme = max(set(schemes), key=schemes.count) if schemes else "scrypt"
            self._verify(_dummy_entry(scheme), password)
            return AuthResult(None, "unknown user")
        if not self._verify(entry, password):
            return AuthResult(None, "wrong password")
        user = _user(entry)
        with self._lock:
            # A reload while we were hashing may have changed this user; do not cache then.
            if self._entries is entries:
                self._hits[key] = user
                while len(self._hits) > self._max_entries:
                    self._hits.popitem(last=False)
        return AuthResult(user, "ok")

    def check(self, username: str, password: str) -> User | None:
        """The authenticated user, or None for an unknown user or a wrong password."""
        return self.authenticate(username, password).user


class FailureThrottle:
    """Slows down password guessing from one client address.

    After ``threshold`` failures within ``window`` seconds, :meth:`delay_for` returns
    ``base_delay`` and doubles with each further failure, up to ``max_delay``. Failures older
    than the window are forgotten. Pure bookkeeping: the server decides where to sleep.

    Tableau Server sends every user's requests from the same few addresses, so the server
    should delay only the *failing* response (before sending 401), never a request whose
    credentials are good, or one misconfigured workbook would slow everyone down.
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        window: float = 60.0,
        base_delay: float = 0.5,
        max_delay: float = 10.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or window <= 0 or base_delay < 0 or max_delay < base_delay:
            raise ValueError("invalid throttle settings")
        self.threshold = threshold
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # Beyond this many failures the delay is already capped, so older ones need not be kept.
        doublings = 0
        while base_delay > 0 and base_delay * (2**doublings) < max_delay:
            doublings += 1
        self._keep = threshold + doublings + 1
        # Told of each failure recorded here, so other front-end processes count it too
        # (frontends.py); ``record_failure(addr, shared=False)`` records theirs.
        self.on_failure: Callable[[str], None] | None = None

    def _recent(self, addr: str, now: float) -> deque[float] | None:
        times = self._failures.get(addr)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[addr]
            return None
        return times

    def record_failure(self, addr: str, shared: bool = True) -> None:
        if shared and self.on_failure is not None:
            self.on_failure(addr)
        now = self._clock()
        with self._lock:
            times = self._recent(addr, now)
            if times is None:
                times = self._failures[addr] = deque(maxlen=self._keep)
            times.append(now)
            self._failures.move_to_end(addr)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def failures(self, addr: str) -> int:
        with self._lock:
            times = self._recent(addr, self._clock())
            return 0 if times is None else len(times)

    def delay_for(self, addr: str) -> float:
        """Seconds to wait before answering a failed attempt from ``addr`` (0 when fine)."""
        count = self.failures(addr)
        if count < self.threshold:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** (count - self.threshold))

    def reset(self, addr: str) -> None:
        with self._lock:
            self._failures.pop(addr, None)
