"""OAuth 2.0 bearer tokens (JWTs), checked the way TabPy 2.16 checks them.

A token is accepted when:

* its signature verifies with a key from the issuer's JWKS (``TABPY_OAUTH_JWKS_URI``), found
  by the token's ``kid``. The algorithm is the key's (its ``kty``/``crv``, and its ``alg``
  when the JWK names one), never the token's: ``alg: none``, and HMAC with a public key as
  the secret, cannot verify. Only asymmetric algorithms count; an ``oct`` key is skipped.
* ``iss`` equals ``TABPY_OAUTH_ISSUER``; ``aud`` contains ``TABPY_OAUTH_AUDIENCE`` when it
  is set; ``exp`` and ``iat`` are present and ``exp`` has not passed (no leeway, as TabPy).
* its ``scope`` claim (space-separated) holds every ``TABPY_OAUTH_REQUIRED_SCOPES`` entry.

Any failure is a 401. Endpoint scopes (``TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES``) are checked
later, per route, by the authenticator: a missing one is a 403.

The JWKS is fetched in a thread, never on the event loop, and cached:

* fresh for ``LIFESPAN`` seconds; after that a known key is still used while one
  background fetch renews the set (up to ``MAX_STALE``, then a request waits for a fetch);
* a token naming an unknown ``kid`` makes one fetch (key rotation); concurrent requests
  share it. If that fetch still lacks the ``kid``, or a fetch fails, no other forced fetch
  happens for ``COOLDOWN`` seconds, so made-up ``kid`` values cannot make tabserve hammer
  the IdP. A new key can then wait up to ``COOLDOWN`` seconds, as in TabPy.

Only https is fetched. The JWKS host must resolve to public addresses unless
``TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS``: checked at start and for every redirect, which must be
https too. Server certificates are checked against the system's CAs (``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` change them).
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from ..config import Settings

log = logging.getLogger("tabserve.oauth")


def _jwt() -> ModuleType:
    """PyJWT, imported on first use: with ``cryptography`` it costs the front end about 9 MB
    of idle memory (measured), which a server without OAuth never needs (a verifier imports
    it when it is made, so the first token does not pay for the import)."""
    import jwt

    return jwt


LIFESPAN = 300.0  # seconds a fetched key set is fresh (PyJWKClient's and TabPy's default)
MAX_STALE = 3600.0  # a key set older than this is not used without a successful fetch
COOLDOWN = 30.0  # no forced fetch this long after a failed fetch or a kid still missing
FETCH_TIMEOUT = 10.0  # seconds per connect or read of the JWKS
MAX_JWKS_BYTES = 1 << 20  # a key set is a few KiB; anything this large is not one

# The algorithm each kind of key verifies with. An RSA key may name PS*/RS* in its "alg";
# for the others the curve decides. Symmetric ("oct") keys are never accepted: the key set is
# public, so an HMAC "secret" from it is no secret.
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})

# The TabPy names of the endpoint scopes, in the order /info lists them.
ENDPOINT_SCOPES = ("query", "evaluate", "deploy")


class OAuthConfigError(Exception):
    """The OAuth setup cannot work (e.g. the JWKS host is not public); one line."""


class TokenRejected(Exception):
    """A bearer token is not accepted; the text is the loggable reason (never the token)."""


class JwksUnavailable(TokenRejected):
    """No usable key set could be had from the IdP."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    key: Any  # a cryptography public key


@dataclass(frozen=True)
class OAuthConfig:
    """The OAuth settings, resolved."""

    issuer: str
    jwks_uri: str
    audience: str
    required_scopes: tuple[str, ...]
    enforce_endpoint_scopes: bool
    scopes: Mapping[str, str]  # "query"/"evaluate"/"deploy" -> the configured scope name
    log_user: bool
    allow_nonpublic: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> OAuthConfig:
        return cls(
            issuer=settings.oauth_issuer,
            jwks_uri=settings.oauth_jwks_uri,
            audience=settings.oauth_audience,
            required_scopes=settings.oauth_required_scopes,
            enforce_endpoint_scopes=settings.oauth_enforce_endpoint_scopes,
            scopes={
                "query": settings.oauth_query_scope,
                "evaluate": settings.oauth_evaluate_scope,
                "deploy": settings.oauth_deploy_scope,
            },
            log_user=settings.oauth_log_user,
            allow_nonpublic=settings.oauth_allow_nonpublic_jwks,
        )

    def info(self) -> dict[str, Any]:
        """What ``/info`` says under ``methods.oauth-jwt``, as TabPy 2.16 says it."""
        return {
            "required_scopes": list(self.required_scopes),
            "endpoint_scopes": list(dict.fromkeys(self.scopes[name] for name in ENDPOINT_SCOPES)),
            "endpoint_scopes_enforced": self.enforce_endpoint_scopes,
        }

    def warnings(self) -> list[str]:
        """Settings that work but are probably not meant (TabPy warns about the same)."""
        found = []
        names = [self.scopes[name] for name in ENDPOINT_SCOPES]
        shared = sorted({scope for scope in names if names.count(scope) > 1})
        if shared:
            found.append(
                f"OAuth endpoint scopes share a name ({', '.join(shared)}): a token with it "
                f"may use every route group that scope is configured for"
            )
        return found


def _shown(text: str, limit: int = 64) -> str:
    # A kid comes from the unverified token: escaped (no forged log lines) and cut short.
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- key sets ----------------------------------------------------------------------------------


def _algorithm_for(jwk: Mapping[str, Any]) -> str:
    """The one algorithm this JWK verifies with; raises ValueError for keys never accepted."""
    kty, named = jwk.get("kty"), jwk.get("alg")
    if kty == "RSA":
        algorithm = named or "RS256"
        if algorithm not in _RSA_ALGORITHMS:
            raise ValueError(f"RSA key with alg {algorithm!r}")
        return str(algorithm)
    if kty == "EC":
        algorithm = _EC_ALGORITHMS.get(jwk.get("crv", ""))
        if algorithm is None or (named and named != algorithm):
            raise ValueError(f"EC key with crv {jwk.get('crv')!r} and alg {named!r}")
        return algorithm
    if kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES or (named and named not in ("EdDSA", "Ed25519")):
            raise ValueError(f"OKP key with crv {jwk.get('crv')!r} and alg {named!r}")
        return "EdDSA"
    raise ValueError(f"key type {kty!r} is not an asymmetric signing key")


def parse_key_set(document: Any) -> tuple[dict[str, SigningKey], list[str]]:
    """The usable signing keys of a JWKS document by kid, and why others were skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWK set (no "keys" list)')
    jwt = _jwt()
    keys: dict[str, SigningKey] = {}
    skipped: list[str] = []
    for number, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"entry {number}: not an object")
            continue
        kid = jwk.get("kid")
        label = f"key {kid!r}" if isinstance(kid, str) else f"entry {number}"
        if not isinstance(kid, str) or not kid:
            skipped.append(f"{label}: no kid")
            continue
        if jwk.get("use") not in (None, "sig"):
            skipped.append(f"{label}: use {jwk.get('use')!r}")
            continue
        try:
            algorithm = _algorithm_for(jwk)
            key = jwt.PyJWK(jwk, algorithm).key
        except (ValueError, jwt.PyJWTError) as exc:
            skipped.append(f"{label}: {exc}")
            continue
        keys[kid] = SigningKey(kid, algorithm, key)
    return keys, skipped


# -- fetching ----------------------------------------------------------------------------------


Resolver = Callable[[str], set[str]]


def resolve(host: str) -> set[str]:
    """Every address ``host`` resolves to (raises OSError)."""
    return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}


def nonpublic_addresses(host: str, resolver: Resolver = resolve) -> list[str]:
    """Addresses of ``host`` that are not public (raises OAuthConfigError if unresolvable).

    "Public" is ``is_global``: an allow-list, so that ranges a deny-list forgets (CGNAT,
    IPv4-mapped IPv6 forms of private addresses) are not public either.
    """
    try:
        addresses = resolver(host)
    except OSError as exc:
        raise OAuthConfigError(
            f"cannot resolve the TABPY_OAUTH_JWKS_URI host {host!r}: {exc}"
        ) from None
    found = []
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not ip.is_global or (mapped is not None and not mapped.is_global):
            found.append(address)
    return found


def check_jwks_host(config: OAuthConfig, resolver: Resolver = resolve) -> str | None:
    """Refuse a JWKS host with non-public addresses unless allowed (OAuthConfigError); when
    allowed, the warning to log."""
    host = urlsplit(config.jwks_uri).hostname or ""
    private = nonpublic_addresses(host, resolver)
    if not private:
        return None
    listed = ", ".join(private)
    if not config.allow_nonpublic:
        raise OAuthConfigError(
            f"the TABPY_OAUTH_JWKS_URI host {host!r} resolves to non-public addresses "
            f"({listed}); set TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS = true only if that is your "
            f"trusted IdP on a private network"
        )
    return (
        f"the TABPY_OAUTH_JWKS_URI host {host!r} resolves to non-public addresses ({listed}), "
        f"allowed by TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS"
    )


class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
    """Follow a JWKS redirect only to https, and only to a public host unless allowed."""

    def __init__(self, allow_nonpublic: bool, resolver: Resolver) -> None:
        self.allow_nonpublic = allow_nonpublic
        self.resolver = resolver

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = urlsplit(newurl)
        if target.scheme.lower() != "https":
            raise urllib.error.URLError(f"refusing a redirect to a non-https URL: {newurl}")
        if not self.allow_nonpublic:
            try:
                private = nonpublic_addresses(target.hostname or "", self.resolver)
            except OAuthConfigError as exc:
                raise urllib.error.URLError(str(exc)) from None
            if private:
                raise urllib.error.URLError(
                    f"refusing a redirect to {target.hostname!r}, a non-public host"
                )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_jwks(
    uri: str,
    *,
    allow_nonpublic: bool,
    resolver: Resolver = resolve,
    context: ssl.SSLContext | None = None,
) -> Any:
    """GET the JWKS document (blocking: run it in a thread); raises JwksUnavailable."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context or ssl.create_default_context()),
        _CheckedRedirect(allow_nonpublic, resolver),
    )
    request = urllib.request.Request(
        uri, headers={"Accept": "application/json", "User-Agent": "tabserve"}
    )
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT) as response:
            body = response.read(MAX_JWKS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise JwksUnavailable(f"fetching the JWKS {uri} failed: HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, TLS failures
        reason = getattr(exc, "reason", None) or exc
        raise JwksUnavailable(f"fetching the JWKS {uri} failed: {reason}") from None
    if len(body) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"the JWKS at {uri} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise JwksUnavailable(f"the JWKS at {uri} is not JSON") from None


# -- the cache ---------------------------------------------------------------------------------


class JwksCache:
    """Signing keys by kid, fetched through ``fetch`` (blocking, run in a thread).

    All state is touched on the event loop only; the thread runs nothing but the fetch.
    """

    def __init__(
        self,
        uri: str,
        fetch: Callable[[], Any],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri = uri
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at: float | None = None
        self._failed_at: float | None = None  # the last fetch that failed
        self._missed_at: float | None = None  # the last forced fetch still without the kid
        self._inflight: asyncio.Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.fetches = 0

    def _age(self) -> float:
        return float("inf") if self._fetched_at is None else self._clock() - self._fetched_at

    def _recent(self, moment: float | None) -> bool:
        return moment is not None and self._clock() - moment < COOLDOWN

    async def key_for(self, kid: str) -> SigningKey:
        age = self._age()
        key = self._keys.get(kid)
        if key is not None and age < MAX_STALE:
            if age >= LIFESPAN and self._inflight is None and not self._recent(self._failed_at):
                self._start_refresh()  # renew in the background; this request goes on
            return key
        if key is None and age < LIFESPAN:
            # A kid the current set lacks: one forced fetch (key rotation), rate-limited.
            if self._recent(self._missed_at) or self._recent(self._failed_at):
                raise TokenRejected(f"no signing key with kid {_shown(kid)} in the JWKS")
        elif self._recent(self._failed_at) and self._inflight is None:
            raise JwksUnavailable(f"the JWKS {self.uri} could not be fetched recently")
        await self.refresh()
        if self._age() >= MAX_STALE:  # never fetched, or the fetch failed and the set is old
            raise JwksUnavailable(f"no usable key set from {self.uri}")
        key = self._keys.get(kid)
        if key is not None:
            return key
        self._missed_at = self._clock()
        raise TokenRejected(f"no signing key with kid {_shown(kid)} in the JWKS")

    async def refresh(self) -> None:
        """Fetch now, or wait for the fetch already running; never raises."""
        if self._inflight is None:
            self._start_refresh()
        assert self._inflight is not None
        await asyncio.shield(self._inflight)

    def _start_refresh(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tabserve-jwks")
        self.fetches += 1
        future = loop.run_in_executor(self._pool, self._fetch)
        done: asyncio.Future[None] = loop.create_future()
        self._inflight = done

        def finished(result: asyncio.Future[Any]) -> None:
            self._inflight = None
            try:
                self._install(result.result())
            except Exception as exc:  # a failed fetch leaves the old keys in place
                self._failed_at = self._clock()
                log.warning("OAuth: %s", exc)
            if not done.done():
                done.set_result(None)

        future.add_done_callback(finished)

    def _install(self, document: Any) -> None:
        try:
            keys, skipped = parse_key_set(document)
        except ValueError as exc:
            raise JwksUnavailable(f"the JWKS at {self.uri} is unusable: {exc}") from None
        for reason in skipped:
            log.info("OAuth: JWKS %s: skipped %s", self.uri, reason)
        if not keys:
            raise JwksUnavailable(f"the JWKS at {self.uri} has no usable signing key")
        added = sorted(set(keys) - set(self._keys))
        self._keys = keys
        self._fetched_at = self._clock()
        self._failed_at = None
        if added:
            log.info("OAuth: signing keys from %s: %s", self.uri, ", ".join(sorted(keys)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# -- tokens ------------------------------------------------------------------------------------


def granted_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """The token's ``scope`` claim as a set; anything but a string grants nothing."""
    scope = claims.get("scope", "")
    return frozenset(scope.split()) if isinstance(scope, str) else frozenset()


class BearerVerifier:
    """Checks a bearer token against the configuration; yields its claims."""

    def __init__(self, config: OAuthConfig, keys: JwksCache) -> None:
        self.config = config
        self.keys = keys
        self._jwt = _jwt()  # imported now, at start, not on the event loop by the first token

    @classmethod
    def from_settings(cls, settings: Settings) -> BearerVerifier:
        config = OAuthConfig.from_settings(settings)

        def fetch() -> Any:
            return fetch_jwks(config.jwks_uri, allow_nonpublic=config.allow_nonpublic)

        return cls(config, JwksCache(config.jwks_uri, fetch))

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; raises TokenRejected with the reason."""
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed token: {exc}") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the token names no signing key (no kid)")
        key = await self.keys.key_for(kid)
        config = self.config
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                issuer=config.issuer,
                audience=config.audience or None,
                options={"require": ["exp", "iat", "iss"], "verify_aud": bool(config.audience)},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"{exc} (kid {_shown(kid)})") from None
        missing = [s for s in config.required_scopes if s not in granted_scopes(claims)]
        if missing:
            raise TokenRejected(f"the token lacks required scope(s) {', '.join(missing)}")
        return claims

    def close(self) -> None:
        self.keys.close()
