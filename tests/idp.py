"""A test identity provider: a JWKS served over https on loopback, and keys that sign tokens.

The https server's certificate chains to a test root CA (``ca_file``); a tabserve process
trusts it through ``SSL_CERT_FILE``. Keys are generated here; ``publish`` chooses which of
them the JWKS lists, so tests can rotate keys while tabserve runs. ``fetches`` counts JWKS
requests and ``delay`` makes the next answers slow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pki import make_pki

ISSUER = "https://idp.tabserve.test/"
AUDIENCE = "tabserve-tests"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdP:
    def __init__(self, workdir: Path) -> None:
        pki = make_pki()
        self.ca_file = workdir / "idp-ca.pem"
        self.ca_file.write_bytes(pki.root.pem)
        chain, key = workdir / "idp-chain.pem", workdir / "idp-key.pem"
        chain.write_bytes(pki.leaf.pem + pki.intermediate.pem)
        key.write_bytes(pki.leaf.key_pem())
        self.keys: dict[str, PrivateKey] = {}
        self.published: list[str] = []
        self.fetches = 0
        self.delay = 0.0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/redirect-to-http":
                    self.send_response(302)
                    self.send_header("Location", idp.jwks_uri.replace("https:", "http:"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                idp.fetches += 1
                if idp.delay:
                    time.sleep(idp.delay)
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.jwks_uri = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- keys ------------------------------------------------------------------------------

    def new_key(self, kid: str, kind: str = "EC", *, publish: bool = True) -> PrivateKey:
        key: PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if kind == "EC"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        self.keys[kid] = key
        if publish:
            self.published.append(kid)
        return key

    def publish(self, *kids: str) -> None:
        self.published = list(kids)

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid in self.published:
            public = self.keys[kid].public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
            else:
                jwk = ECAlgorithm.to_jwk(public, as_dict=True)
            entries.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": entries}

    def public_pem(self, kid: str) -> bytes:
        public = self.keys[kid].public_key()
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- tokens ----------------------------------------------------------------------------

    def claims(self, scope: str = "", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice@example.com",
            "iat": now,
            "exp": now + 300,
            "scope": scope,
        }
        claims.update(overrides)
        return {key: value for key, value in claims.items() if value is not None}

    def token(
        self, kid: str, scope: str = "", *, key: PrivateKey | None = None, **overrides: Any
    ) -> str:
        """A token signed by ``key`` (the kid's own by default), naming ``kid``."""
        signer = key if key is not None else self.keys[kid]
        algorithm = "RS256" if isinstance(signer, rsa.RSAPrivateKey) else "ES256"
        claims = self.claims(scope, **overrides)
        return jwt.encode(claims, signer, algorithm=algorithm, headers={"kid": kid})

    def unsigned_token(self, kid: str, scope: str = "", **overrides: Any) -> str:
        """``alg: none``: no signature at all."""
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
        payload = _b64(json.dumps(self.claims(scope, **overrides)).encode())
        return f"{header}.{payload}."

    def hmac_token(self, kid: str, scope: str = "", **overrides: Any) -> str:
        """HS256 with the kid's *public* key as the secret: the classic algorithm confusion."""
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = _b64(json.dumps(self.claims(scope, **overrides)).encode())
        signing_input = f"{header}.{payload}".encode()
        mac = hmac.new(self.public_pem(kid), signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(mac)}"
