"""Request authentication: an ``Authorization`` header and a client address in, a user out.

With a password file (``TABPY_PWD_FILE``) every API request must carry HTTP Basic
credentials (RFC 7617) of a user in the file; with ``TABPY_OAUTH_ENABLED``, a JWT bearer
token (``oauth.BearerVerifier``). With both, the header's scheme picks the method, as in
TabPy: ``Bearer`` goes to OAuth, anything else to Basic. With neither, credentials are
refused with TabPy's 406, because a client that sends them believes they protect something.

* The header is split at the **first** ``:``, so passwords may contain ``:`` (TabPy splits at
  every ``:`` and such passwords never work there). The scheme name is case-insensitive.
* A verified (user, password) pair is remembered by
  :class:`~tabserve.server.credentials.CredentialCache`, so the hash (PBKDF2 or scrypt,
  milliseconds each) is computed once, not per request, and never on the event loop: a
  cache miss is hashed in a small thread pool, and identical concurrent misses share one
  hash.
* The file is re-read when it changes (checked at most once a second); :meth:`reload`
  (wired to SIGHUP) forces it.
* Each failure is logged with its reason and never with a secret. After repeated failures
  from one address, the 401 is delayed
  (:class:`~tabserve.server.credentials.FailureThrottle`); valid credentials are never
  delayed, since Tableau Server sends every user's requests from the same few addresses.

A bearer token's user holds the permissions its scopes grant: all of them, unless
``TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES``; then ``evaluate``, ``query`` and ``manage`` come from
the evaluate, query and deploy scopes, and a missing one is TabPy's 403 with
``WWW-Authenticate: Bearer error="insufficient_scope"``.

Nothing here knows HTTP framing: handlers pass the header value and the address, and get a
:class:`~tabserve.server.credentials.User` or a :class:`~tabserve.errors.TabserveError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import BadRequest, Forbidden, InsufficientScope, NotAcceptable, Unauthorized
from ..store.api_keys import MalformedKey
from ..store.passwords import (
    ALL_PERMISSIONS,
    PERMISSION_ORDER,
    PasswordEntry,
    normalize_username,
)
from .api_keys import ApiKeys
from .credentials import AuthResult, CredentialCache, FailureThrottle, User
from .oauth import BearerVerifier, TokenRejected, granted_scopes

log = logging.getLogger("tabserve.auth")

# Who a request runs as when authentication is off: allowed everything, as in TabPy.
ANONYMOUS = User("", ALL_PERMISSIONS)

# The endpoint scope (TabPy's name; the configured scope for it) each permission needs.
_SCOPE_FOR = {"evaluate": "evaluate", "query": "query", "manage": "deploy"}

# What each permission allows, for 403 messages.
_ALLOWS = {
    "evaluate": "run ad-hoc scripts (/evaluate)",
    "query": "query deployed endpoints (/query)",
    "manage": "deploy, update or delete endpoints",
}

# Tableau's Test Connection (and its check before SCRIPT_ calls), with credentials, sends
# this script. It runs no user code, so any authenticated user may send it, including one
# without the 'evaluate' permission (e.g. a query-only user for MODEL_EXTENSION_ calls).
_CONNECTION_TEST_SCRIPT = "return int(1)"
_CONNECTION_TEST_MAX_BYTES = 1024

# Enough threads to keep a cache miss from queueing behind another, few enough that a flood
# of wrong passwords cannot take more than this many cores away from the workers.
_HASH_THREADS = 2


@dataclass(frozen=True)
class Credentials:
    """A user name and password from a Basic ``Authorization`` header."""

    username: str
    password: str

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"Credentials(username={self.username!r}, password=<hidden>)"


class BadHeader(ValueError):
    """The ``Authorization`` header is not usable Basic credentials; the text is loggable."""


def _shown(text: str, limit: int = 64) -> str:
    # For log lines: repr escapes control characters (no forged log lines), and the cut keeps
    # a pasted token or a password typed as a user name from being logged in full.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_basic(header: str) -> Credentials:
    """Parse ``Basic <base64(user:password)>`` per RFC 7617; raise :class:`BadHeader`."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise BadHeader(f"unsupported scheme {_shown(scheme, 20)} (only Basic is accepted)")
    token = token.strip()
    if not token:
        raise BadHeader("Basic scheme without credentials")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadHeader("Basic credentials are not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadHeader("Basic credentials are not UTF-8 text") from None
    username, colon, password = text.partition(":")
    if not colon:
        raise BadHeader("Basic credentials have no ':' between user name and password")
    return Credentials(username, password)


def is_connection_test(body: bytes, encoding: str = "") -> bool:
    """Whether ``body`` is Tableau's connection test (a tiny, fixed /evaluate script)."""
    if len(body) > _CONNECTION_TEST_MAX_BYTES:  # checked first: no large body is parsed here
        return False
    if encoding == "gzip":
        try:
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(body, _CONNECTION_TEST_MAX_BYTES + 1)
        except zlib.error:
            return False
    elif encoding:
        return False
    if len(body) > _CONNECTION_TEST_MAX_BYTES:
        return False
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    script = document.get("script") if isinstance(document, dict) else None
    return isinstance(script, str) and script.strip() == _CONNECTION_TEST_SCRIPT


def _key_in(header: str | None, api_key: str | None) -> str | None:
    """The API key a request sends (``Authorization: Key <key>`` or ``?api_key=``), if any;
    its form is checked later, so that a malformed key is a 401 like a wrong one."""
    scheme, _, rest = header.strip().partition(" ") if header else ("", "", "")
    from_header = rest.strip() if scheme.lower() == "key" else None
    if api_key is not None and header is not None:
        raise BadRequest(
            "Credentials sent twice",
            "Send an API key either as ?api_key= or in the Authorization header, not both.",
        )
    return from_header if from_header is not None else api_key


def _endpoint_only(endpoint: str) -> Forbidden:
    return Forbidden(
        "This API key may only call one endpoint.",
        f"An endpoint key reaches /query/{endpoint} (and that endpoint's jobs and results), "
        "nothing else.",
    )


def _token_identity(issuer: str, subject: object, token: str) -> str:
    """Who a token's user is, for owning things (Flight tables): its subject at the issuer,
    hashed so that the sub is never shown where TABPY_OAUTH_LOG_USER is off. The ':' keeps
    it apart from every password-file name (which cannot hold one); a token without a sub
    is only itself, so it shares with no other token."""
    who = f"{issuer}\0{subject}" if isinstance(subject, str) else f"\0{token}"
    return "bearer:" + hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Authenticator:
    """Checks requests against the password file and bearer tokens, or refuses credentials
    when there is neither.

    ``cache`` None means no Basic authentication, ``bearer`` None no OAuth; both None means
    authentication is off. ``sleep`` is how the 401 delay is waited for (a parameter so that
    tests need not wait).
    """

    def __init__(
        self,
        cache: CredentialCache | None,
        *,
        realm: str,
        throttle: FailureThrottle | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        bearer: BearerVerifier | None = None,
    ) -> None:
        self.cache = cache
        self.bearer = bearer
        self.realm = realm
        self.throttle = throttle
        # API keys (``Authorization: Key``, ``?api_key=``): set by the app when auth is on.
        self.keys: ApiKeys | None = None
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        # Identical concurrent cache misses wait for one hash instead of computing several.
        self._pending: dict[bytes, asyncio.Future[AuthResult]] = {}
        self._pending_key = secrets.token_bytes(32)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str] | None, *, realm: str, max_delay: float
    ) -> Authenticator:
        """Load the password file (raises ``PasswordFileError``); None turns auth off."""
        if path is None:
            return cls(None, realm=realm)
        throttle = None
        if max_delay > 0:
            throttle = FailureThrottle(base_delay=min(0.5, max_delay), max_delay=max_delay)
        return cls(CredentialCache(path), realm=realm, throttle=throttle)

    @classmethod
    def from_entries(
        cls, entries: dict[str, PasswordEntry], *, realm: str, max_delay: float
    ) -> Authenticator:
        """Authentication on, with users from a store (``replace_users`` keeps them current)."""
        throttle = None
        if max_delay > 0:
            throttle = FailureThrottle(base_delay=min(0.5, max_delay), max_delay=max_delay)
        return cls(CredentialCache(None, entries=entries), realm=realm, throttle=throttle)

    def replace_users(self, entries: dict[str, PasswordEntry]) -> None:
        if self.cache is not None:
            self.cache.replace(entries)

    @property
    def enabled(self) -> bool:
        return self.cache is not None or self.bearer is not None

    @property
    def uses_password_file(self) -> bool:
        return self.cache is not None and self.cache.path is not None

    @property
    def user_count(self) -> int:
        return len(self.cache.users) if self.cache is not None else 0

    async def authenticate(
        self,
        header: str | None,
        client: str,
        api_key: str | None = None,
        *,
        key_in_url: bool = False,
    ) -> User:
        """The user a request runs as; raises Unauthorized (401) or NotAcceptable (406).

        ``api_key`` is the ``api_key`` query argument; a ``Key`` header is the other way to
        send one. Sending both a header and the argument is a 400. ``key_in_url`` says
        whether the route and verb take the argument at all (only result downloads do):
        elsewhere it is a 401 saying so.
        """
        if api_key is not None and not key_in_url and self.enabled:
            # A key in a URL ends up in browser histories, proxy logs and Referer headers:
            # accepted only where nothing else can be sent (a link a browser or spreadsheet
            # fetches), so that a client cannot get used to it elsewhere.
            log.warning("Authentication failed from %s: ?api_key= on a route without it", client)
            raise Unauthorized(
                "API keys are not accepted in the URL here",
                "?api_key= is only accepted by GET /query_results/<id>.json and "
                "/query_results/<id>.csv (download links); send the key in the header "
                "'Authorization: Key <key>' instead.",
                realm=self.realm,
            )
        key = _key_in(header, api_key)
        if not self.enabled:
            return self._without_auth(header, client, key_sent=key is not None)
        if key is not None:
            return await self._authenticate_key(key, client)
        if self.bearer is not None:
            scheme = header.strip().partition(" ")[0].lower() if header else ""
            if scheme == "bearer" or self.cache is None:
                return await self._authenticate_bearer(self.bearer, header, client)
        assert self.cache is not None
        if header is None:
            raise self._refuse(client, "no Authorization header")
        try:
            credentials = parse_basic(header)
        except BadHeader as exc:
            raise self._refuse(client, str(exc)) from None
        user = self.cache.cached(credentials.username, credentials.password)
        if user is not None:
            return user
        result = await self._check(credentials)
        if result.user is not None:
            return result.user
        name = _shown(normalize_username(credentials.username))
        reason = "unknown user" if result.reason == "unknown user" else "wrong password for user"
        await self._delay_failure(client)
        raise self._refuse(client, f"{reason} {name}")

    def authorize(self, user: User, permission: str | None) -> None:
        """Raise Forbidden (403) unless ``user`` holds ``permission`` (None: any user may);
        for a token, InsufficientScope naming the scope."""
        if permission is None or user.can(permission):
            return
        if user.scopes is not None and self.bearer is not None:
            scope = self.bearer.config.scopes[_SCOPE_FOR.get(permission, permission)]
            log.warning("Permission denied: the bearer token lacks the scope %r", scope)
            raise InsufficientScope(scope, realm=self.realm)
        granted = ",".join(p for p in PERMISSION_ORDER if p in user.permissions) or "nothing"
        log.warning(
            "Permission denied: user %s lacks %r (has %s)", _shown(user.name), permission, granted
        )
        # Name where the permissions come from, so the operator knows what to edit.
        from_store = self.cache is not None and not self.uses_password_file
        source = "the store" if from_store else "the password file"
        raise Forbidden(
            f"User '{user.name}' is not allowed to {_ALLOWS.get(permission, permission)}.",
            f"This needs the '{permission}' permission; {source} grants this user: {granted}.",
        )

    def authorize_route(self, user: User, access: str | None, name: str | None) -> None:
        """An endpoint key's check, made for every authenticated request before the
        permission's: a route not declared for endpoint keys (``access`` None) is refused;
        ``"name"``: the path's endpoint ``name`` must be the key's; ``"resource"``: the
        handler serves only what ``jobs.can_see`` lets the key see (a 404 otherwise, as
        for any caller's job that is not theirs)."""
        if user.endpoint is None or access == "resource":
            return
        if access == "name" and name == user.endpoint:
            return
        log.warning(
            "Permission denied: endpoint key %s (for %s) used on another route or endpoint",
            user.key_id, _shown(user.endpoint),
        )  # fmt: skip
        raise _endpoint_only(user.endpoint)

    def authorize_evaluate(
        self, user: User, size: int, body: Callable[[], bytes], encoding: str
    ) -> None:
        """Like ``authorize(user, "evaluate")``, but Tableau's connection test is allowed to
        password-file users (a token needs the evaluate scope even for that, as in TabPy).
        ``body`` gives the request body (``size`` bytes): only asked for (and joined) when
        the exemption could apply, which a large body cannot."""
        if user.can("evaluate") or (
            user.scopes is None
            and size <= _CONNECTION_TEST_MAX_BYTES
            and is_connection_test(body(), encoding)
        ):
            return
        self.authorize(user, "evaluate")

    def script_query_refusal(self, user: User) -> str | None:
        """Why ``tabpy.query()`` inside this user's script is refused, or None if allowed.

        A token needs the query scope for it, as TabPy's nested /query call forwards the
        token; a password-file user's ``evaluate`` permission is enough (docs/security.md).
        """
        if user.scopes is None or user.can("query") or self.bearer is None:
            return None
        scope = self.bearer.config.scopes["query"]
        return f"tabpy.query() needs the '{scope}' scope, which the caller's token lacks"

    def reload(self) -> bool:
        """Re-read the password file now (SIGHUP); True when a new version was loaded."""
        if self.cache is None:
            log.info("No password file to reload (TABPY_PWD_FILE is not set)")
            return False
        return self.cache.reload_if_changed(force=True)

    def readiness(self) -> tuple[bool, str]:
        """The ``passwords`` readiness check: False while the file on disk cannot be used.

        The last good copy stays in force meanwhile (a broken edit must not lock everyone
        out), but an operator must hear of it: a revocation in that edit is not applied.
        The detail names neither the file nor the parse error (the route is public; the
        log has both).
        """
        if self.cache is None:
            return True, "authentication off"
        self.cache.reload_if_changed()  # notices a change even when nobody logs in
        users = len(self.cache.users)
        if self.cache.last_error is not None:
            return False, (
                f"the password file cannot be read or parsed; the last good copy ({users} "
                "users) stays in force until it is fixed (the log says why)"
            )
        return True, f"{users} users loaded"

    def close(self) -> None:
        if self.bearer is not None:
            self.bearer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _authenticate_bearer(
        self, bearer: BearerVerifier, header: str | None, client: str
    ) -> User:
        if header is None:
            raise self._refuse(client, "no Authorization header", scheme="Bearer")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            reason = f"unsupported scheme {_shown(scheme, 20)} (only Bearer is accepted)"
            raise self._refuse(client, reason, scheme="Bearer")
        if not token:
            raise self._refuse(client, "Bearer scheme without a token", scheme="Bearer")
        try:
            claims = await bearer.verify(token)
        except TokenRejected as exc:
            log.warning("Authentication failed from %s: bearer token rejected: %s", client, exc)
            raise Unauthorized(realm=self.realm, scheme="Bearer", token_sent=True) from None
        config = bearer.config
        scopes = granted_scopes(claims)
        if config.enforce_endpoint_scopes:
            permissions = frozenset(
                permission
                for permission, name in _SCOPE_FOR.items()
                if config.scopes[name] in scopes
            )
        else:
            permissions = ALL_PERMISSIONS
        subject = claims.get("sub")
        # Named only when TABPY_OAUTH_LOG_USER says so: a sub is often an e-mail address.
        name = subject if config.log_user and isinstance(subject, str) else ""
        return User(name, permissions, scopes, _token_identity(config.issuer, subject, token))

    def _without_auth(self, header: str | None, client: str, *, key_sent: bool) -> User:
        if header is None and not key_sent:
            return ANONYMOUS
        if not key_sent:
            try:
                parse_basic(header or "")
            except BadHeader:
                return ANONYMOUS  # TabPy treats an unparseable header as absent
        # An API key too: whoever sends one believes it protects something.
        log.warning(
            "Credentials from %s refused with 406: authentication is off (no TABPY_PWD_FILE)",
            client,
        )
        raise NotAcceptable(realm=self.realm)

    async def _authenticate_key(self, key: str, client: str) -> User:
        if self.keys is None:  # auth by bearer tokens only, say: no store of keys here
            raise self._refuse(client, "API keys are not accepted here")
        try:
            user, reason = await self.keys.check(key)
        except MalformedKey as exc:
            user, reason = None, f"malformed API key: {exc}"
        if user is not None:
            return user
        await self._delay_failure(client)
        raise self._refuse(client, reason)

    async def _check(self, credentials: Credentials) -> AuthResult:
        assert self.cache is not None
        key = hmac.new(
            self._pending_key,
            credentials.username.encode("utf-8", "surrogatepass")
            + b"\0"
            + credentials.password.encode("utf-8", "surrogatepass"),
            hashlib.sha256,
        ).digest()
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="tabserve-auth")
        future = loop.run_in_executor(
            self._pool, self.cache.authenticate, credentials.username, credentials.password
        )
        self._pending[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._pending.pop(key, None)
            else:  # the request went away; keep sharing the hash until it finishes
                future.add_done_callback(lambda _: self._pending.pop(key, None))

    async def _delay_failure(self, client: str) -> None:
        if self.throttle is None:
            return
        self.throttle.record_failure(client)
        delay = self.throttle.delay_for(client)
        if delay > 0:
            log.warning(
                "Slowing down %s: %d failed logins in %.0f s, answering after %.1f s",
                client,
                self.throttle.failures(client),
                self.throttle.window,
                delay,
            )
            await self._sleep(delay)

    def _refuse(self, client: str, reason: str, scheme: str = "Basic") -> Unauthorized:
        log.warning("Authentication failed from %s: %s", client, reason)
        return Unauthorized(realm=self.realm, scheme=scheme)
