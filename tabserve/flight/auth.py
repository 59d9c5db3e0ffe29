"""Who a Flight call runs as: the front end's Authenticator decides, asked over the control
socket; a Basic login also earns a session token, as in TabPy."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.flight as flight

from .control import ControlChannel

# A Basic login's session token is accepted back as Bearer this long (TabPy: an hour).
SESSION_SECONDS = 3600.0
# A token is reissued rather than reused when it has less than this left.
SESSION_RENEW_SECONDS = 300.0
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class Caller:
    """Who a Flight call runs as, as the front end's Authenticator decided."""

    name: str
    permissions: frozenset[str]
    header: str | None  # the credentials to present again for a permission check


class AuthRelay:
    """Asks the front end who a call's ``Authorization`` header belongs to."""

    def __init__(self, control: ControlChannel) -> None:
        self.control = control

    def authenticate(self, header: str | None, permission: str | None = None) -> Caller:
        try:
            answer = self.control.request(
                {"op": "auth", "header": header, "permission": permission}
            )
        except OSError as exc:
            raise flight.FlightUnavailableError(f"authentication is unavailable: {exc}") from None
        status = answer.get("status", 200)
        if status == 200:
            return Caller(answer["user"], frozenset(answer.get("permissions", ())), header)
        message = str(answer.get("message") or "Unauthorized")
        if status == 403:
            raise flight.FlightUnauthorizedError(message)
        raise flight.FlightUnauthenticatedError(message)


class Sessions:
    """Session tokens issued for Basic logins: token -> (credentials, expiry). Thread-safe.

    A token stands for the credentials that earned it; they are sent to the front end again
    on every use, so a changed password or a removed user takes effect at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_token: dict[str, tuple[str, float]] = {}
        self._by_credentials: dict[bytes, str] = {}
        self._key = secrets.token_bytes(32)

    def _fingerprint(self, header: str) -> bytes:
        return hmac.new(self._key, header.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def issue(self, header: str) -> str:
        now = time.monotonic()
        fingerprint = self._fingerprint(header)
        with self._lock:
            token = self._by_credentials.get(fingerprint)
            if token is not None:
                _, expiry = self._by_token[token]
                if expiry - now > SESSION_RENEW_SECONDS:
                    return token
            self._evict(now)
            token = secrets.token_urlsafe(32)
            self._by_token[token] = (header, now + SESSION_SECONDS)
            self._by_credentials[fingerprint] = token
            return token

    def credentials(self, token: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            entry = self._by_token.get(token)
            if entry is None or entry[1] <= now:
                return None
            return entry[0]

    def _evict(self, now: float) -> None:  # with _lock held
        expired = [t for t, (_, expiry) in self._by_token.items() if expiry <= now]
        if len(self._by_token) - len(expired) >= MAX_SESSIONS:
            expired = list(self._by_token)  # a flood of logins: start over
        for token in expired:
            header, _ = self._by_token.pop(token)
            self._by_credentials.pop(self._fingerprint(header), None)


def authorization_header(headers: Mapping[str, Any]) -> str | None:
    """The one ``Authorization`` value of a call; None when absent, empty or ambiguous."""
    values: set[str] = set()
    for name, given in headers.items():
        if name.lower() == "authorization":
            values.update(given if isinstance(given, list | tuple) else [given])
    if len(values) != 1:
        return None  # two different credentials: which one counts must not be a guess
    value = values.pop()
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value or None


class _CallAuth(flight.ServerMiddleware):
    def __init__(self, caller: Caller, token: str | None) -> None:
        self.caller = caller
        self.token = token

    def sending_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


class AuthFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call, the handshake included, before any handler runs."""

    def __init__(self, relay: AuthRelay, sessions: Sessions) -> None:
        self.relay = relay
        self.sessions = sessions

    def start_call(self, info: flight.CallInfo, headers: Mapping[str, Any]) -> _CallAuth:
        header = authorization_header(headers)
        scheme, _, value = (header or "").partition(" ")
        presented = header
        if scheme.lower() == "bearer":
            known = self.sessions.credentials(value.strip())
            if known is not None:
                presented = known  # our own session token: the login it stands for
        caller = self.relay.authenticate(presented)
        token = None
        if presented and presented.partition(" ")[0].lower() == "basic" and caller.name:
            token = self.sessions.issue(presented)
        return _CallAuth(caller, token)


class NoHandshake(flight.ServerAuthHandler):
    """The handshake itself needs nothing: the middleware has authenticated it already."""

    def authenticate(self, outgoing: Any, incoming: Any) -> None:
        return None

    def is_valid(self, token: bytes) -> str:
        return ""
