"""The OAuth pieces on their own: which JWKs count, the key cache's timing rules, the JWKS
host rules, and fetching over https (from the test IdP on loopback)."""

from __future__ import annotations

import asyncio
import email.message
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from idp import IdP

from tabserve.config import load_settings
from tabserve.server import oauth
from tabserve.server.oauth import (
    COOLDOWN,
    LIFESPAN,
    MAX_STALE,
    JwksCache,
    JwksUnavailable,
    OAuthConfig,
    OAuthConfigError,
    TokenRejected,
    check_jwks_host,
    fetch_jwks,
    nonpublic_addresses,
    parse_key_set,
)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    provider = IdP(tmp_path_factory.mktemp("idp"))
    provider.new_key("ec-1")
    provider.new_key("rsa-1", "RSA")
    yield provider
    provider.close()


# --- which keys count ------------------------------------------------------------------------


def test_the_algorithm_comes_from_the_key(idp: IdP) -> None:
    ec, rsa = idp.jwks()["keys"]
    document = {
        "keys": [
            ec,
            rsa,
            {**rsa, "kid": "rsa-pss", "alg": "PS256"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},  # a shared secret, published
            {**rsa, "kid": "rsa-as-hmac", "alg": "HS256"},
            {**rsa, "kid": "rsa-none", "alg": "none"},
            {**ec, "kid": "ec-wrong-alg", "alg": "ES384"},  # P-256 verifies ES256 only
            {**ec, "kid": "encryption", "use": "enc"},
            {**ec, "kid": None},
            "not a key",
        ]
    }
    keys, skipped = parse_key_set(document)
    assert {kid: key.algorithm for kid, key in keys.items()} == {
        "ec-1": "ES256", "rsa-1": "RS256", "rsa-pss": "PS256",
    }  # fmt: skip
    assert len(skipped) == 7
    with pytest.raises(ValueError, match="keys"):
        parse_key_set({"not": "a key set"})


# --- the cache -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeIdP:
    """A JWKS fetch in-process: the document to return, or an error to raise."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fail = False
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise JwksUnavailable("the IdP is down")
        return self.document


def only(idp: IdP, *kids: str) -> dict[str, Any]:
    return {"keys": [k for k in idp.jwks()["keys"] if k["kid"] in kids]}


def test_cache_fetches_once_renews_in_the_background_and_rate_limits(idp: IdP) -> None:
    async def scenario() -> None:
        clock, fake = Clock(), FakeIdP(only(idp, "ec-1"))
        cache = JwksCache("https://idp/jwks", fake, clock=clock)
        # Concurrent first requests share one fetch.
        keys = await asyncio.gather(*(cache.key_for("ec-1") for _ in range(5)))
        assert {key.kid for key in keys} == {"ec-1"} and fake.calls == 1

        # Rotation: an unknown kid makes one fetch, which finds it.
        fake.document = only(idp, "rsa-1")
        assert (await cache.key_for("rsa-1")).algorithm == "RS256"
        assert fake.calls == 2
        # The rotated-out key is gone after a forced fetch; then made-up kids fetch nothing.
        with pytest.raises(TokenRejected, match="ec-1"):
            await cache.key_for("ec-1")
        assert fake.calls == 3
        for kid in ("x", "y", "ec-1"):
            with pytest.raises(TokenRejected):
                await cache.key_for(kid)
        assert fake.calls == 3
        clock.now += COOLDOWN
        fake.document = only(idp, "rsa-1", "ec-1")
        assert (await cache.key_for("ec-1")).kid == "ec-1"  # a new key, after the cooldown
        assert fake.calls == 4

        # Past its lifespan the set still serves known keys while one fetch renews it.
        clock.now += LIFESPAN + 1
        fake.fail = True
        assert (await cache.key_for("ec-1")).kid == "ec-1"
        await asyncio.sleep(0.05)
        assert fake.calls == 5
        assert (await cache.key_for("ec-1")).kid == "ec-1"  # IdP down: no refetch storm
        assert fake.calls == 5
        # Too old to trust without a fetch, and the IdP down: refused.
        clock.now += MAX_STALE
        with pytest.raises(JwksUnavailable):
            await cache.key_for("ec-1")
        clock.now += COOLDOWN
        fake.fail = False
        assert (await cache.key_for("ec-1")).kid == "ec-1"
        cache.close()

    asyncio.run(scenario())


def test_cache_without_any_key_set_refuses_and_retries_after_the_cooldown(idp: IdP) -> None:
    async def scenario() -> None:
        clock, fake = Clock(), FakeIdP({"keys": []})
        cache = JwksCache("https://idp/jwks", fake, clock=clock)
        with pytest.raises(JwksUnavailable):
            await cache.key_for("ec-1")  # fetched, but no usable key
        fake.document = only(idp, "ec-1")
        with pytest.raises(JwksUnavailable):
            await cache.key_for("ec-1")  # within the cooldown: not fetched again
        assert fake.calls == 1
        clock.now += COOLDOWN
        assert (await cache.key_for("ec-1")).kid == "ec-1"
        cache.close()

    asyncio.run(scenario())


# --- the JWKS host and fetching --------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "private"),
    [
        ({"93.184.215.14"}, []),
        ({"2606:2800:21f:cb07:6820:80da:af6b:8b2c"}, []),
        ({"127.0.0.1"}, ["127.0.0.1"]),
        ({"10.1.2.3", "93.184.215.14"}, ["10.1.2.3"]),
        ({"169.254.169.254"}, ["169.254.169.254"]),  # cloud metadata
        ({"100.64.0.1"}, ["100.64.0.1"]),  # carrier-grade NAT
        ({"::ffff:10.0.0.1"}, ["::ffff:10.0.0.1"]),
        ({"fe80::1%eth0"}, ["fe80::1%eth0"]),
    ],
)
def test_only_public_addresses_are_public(addresses: set[str], private: list[str]) -> None:
    assert nonpublic_addresses("idp.example", lambda host: addresses) == private


def _config(uri: str, allow: bool) -> OAuthConfig:
    settings = load_settings(
        None,
        {
            "TABPY_OAUTH_ENABLED": "true",
            "TABPY_OAUTH_ISSUER": "https://idp.example/",
            "TABPY_OAUTH_JWKS_URI": uri,
            "TABPY_OAUTH_AUDIENCE": "tabserve",
            "TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS": str(allow).lower(),
        },
    )
    return OAuthConfig.from_settings(settings)


def test_jwks_host_must_be_public_unless_allowed() -> None:
    with pytest.raises(OAuthConfigError, match="non-public addresses"):
        check_jwks_host(_config("https://127.0.0.1/jwks", allow=False))
    warning = check_jwks_host(_config("https://127.0.0.1/jwks", allow=True))
    assert warning is not None and "allowed by TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS" in warning
    with pytest.raises(OAuthConfigError, match="cannot resolve"):
        check_jwks_host(_config("https://no-such-host.invalid/jwks", allow=True))


def _trusting(idp: IdP) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(idp.ca_file))


def test_fetch_over_https_with_the_test_ca(idp: IdP) -> None:
    document = fetch_jwks(idp.jwks_uri, allow_nonpublic=True, context=_trusting(idp))
    assert [key["kid"] for key in document["keys"]] == ["ec-1", "rsa-1"]


def test_fetch_refuses_an_untrusted_certificate_and_a_redirect_to_http(idp: IdP) -> None:
    with pytest.raises(JwksUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_jwks(idp.jwks_uri, allow_nonpublic=True, context=ssl.create_default_context())
    redirect = idp.jwks_uri.replace("/jwks.json", "/redirect-to-http")
    with pytest.raises(JwksUnavailable, match="non-https"):
        fetch_jwks(redirect, allow_nonpublic=True, context=_trusting(idp))


def test_a_redirect_must_go_to_a_public_https_host_unless_allowed() -> None:
    request = urllib.request.Request("https://idp.example/jwks")
    headers = email.message.Message()
    internal = "https://internal.example/jwks.json"
    refusing = oauth._CheckedRedirect(False, lambda host: {"10.0.0.1"})
    with pytest.raises(urllib.error.URLError, match="non-public"):
        refusing.redirect_request(request, None, 302, "Found", headers, internal)  # type: ignore[arg-type]
    allowing = oauth._CheckedRedirect(True, lambda host: {"10.0.0.1"})
    followed = allowing.redirect_request(request, None, 302, "Found", headers, internal)  # type: ignore[arg-type]
    assert followed is not None and followed.full_url == internal
    with pytest.raises(urllib.error.URLError, match="non-https"):
        allowing.redirect_request(request, None, 302, "Found", headers, "http://idp.example/")  # type: ignore[arg-type]


def test_info_and_warnings(tmp_path: Path) -> None:
    config = _config("https://idp.example/jwks", allow=False)
    assert config.info() == {
        "required_scopes": [],
        "endpoint_scopes": ["tabpy:query", "tabpy:evaluate", "tabpy:deploy"],
        "endpoint_scopes_enforced": False,
    }
    assert config.warnings() == []
    shared = OAuthConfig(**{**config.__dict__, "scopes": {"query": "x", "evaluate": "x",
                                                         "deploy": "d"}})  # fmt: skip
    assert shared.info()["endpoint_scopes"] == ["x", "d"]
    assert "share a name (x)" in shared.warnings()[0]
