"""OAuth bearer tokens over real HTTP: tabserve started with a TabPy 2.16 OAuth config.

The IdP is a JWKS served over https on loopback with a test CA (tests/idp.py), which is what
TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS is for; tabserve trusts the CA through SSL_CERT_FILE.
Tokens are signed here with keys generated here.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.flight as fl
import pytest
import requests
from idp import AUDIENCE, ISSUER, IdP

from helpers import Server, ServerFactory, free_port
from tabserve.store.passwords import hash_password

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ACCESS = "tabserve-tests:access"  # TABPY_OAUTH_REQUIRED_SCOPES
EVALUATE, QUERY, DEPLOY = "tabpy:evaluate", "tabpy:query", "tabpy:deploy"
EVERYTHING = f"openid {ACCESS} {EVALUATE} {QUERY} {DEPLOY}"
UNAUTHORIZED = {"message": "Invalid credentials provided.", "info": "Unauthorized request."}

# Every API route, with a body where it takes one.
ROUTES = [
    ("GET", "/info", None),
    ("POST", "/evaluate", {"script": "return int(1)", "data": {"_arg1": [4]}}),
    ("GET", "/status", None),
    ("GET", "/endpoints", None),
    ("GET", "/endpoints/add", None),
    ("POST", "/endpoints", {"name": "x", "type": "model"}),
    ("PUT", "/endpoints/add", {"description": "x"}),
    ("DELETE", "/endpoints/add", None),
    ("GET", "/query/add", None),
    ("POST", "/query/add", {"data": {"x": [1], "y": [2]}}),
    ("GET", "/configurations/endpoint_upload_destination", None),
    ("GET", "/metrics", None),
]


def add(x: list[float], y: list[float]) -> list[float]:
    return [a + b for a, b in zip(x, y, strict=True)]


def tabpy_oauth_config(idp: IdP, **extra: str) -> dict[str, str]:
    """A TabPy 2.16 OAuth configuration, as a TabPy user would write it (no password file)."""
    return {
        "TABPY_OAUTH_ENABLED": "true",
        "TABPY_OAUTH_ISSUER": ISSUER,
        "TABPY_OAUTH_JWKS_URI": idp.jwks_uri,
        "TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS": "true",
        "TABPY_OAUTH_AUDIENCE": AUDIENCE,
        **extra,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(
    server: Server, method: str, path: str, body: object = None, token: str | None = None
) -> requests.Response:
    headers = bearer(token) if token is not None else {}
    return server.request(method, path, json=body, headers=headers)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    provider = IdP(tmp_path_factory.mktemp("idp"))
    provider.new_key("ec-1")
    provider.new_key("rsa-1", "RSA")
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def oauth_server(server_factory: ServerFactory, idp: IdP) -> Server:
    return server_factory(
        env={"SSL_CERT_FILE": str(idp.ca_file)},
        TABPY_OAUTH_REQUIRED_SCOPES=ACCESS,
        TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES="true",
        TABPY_LOG_DETAILS="true",
        TABPY_OAUTH_LOG_USER="true",
        **tabpy_oauth_config(idp),
    )


def test_tabpy_oauth_config_without_password_file_turns_authentication_on(
    oauth_server: Server,
) -> None:
    # The defect this fixes: this configuration used to start with authentication OFF.
    assert "auth on (oauth)" in oauth_server.log()
    for method, path, body in ROUTES:
        for headers in ({}, {"Authorization": "Basic dXNlcjE6UEBzc3cwcmQ="}):
            answer = oauth_server.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.json() == UNAUTHORIZED
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="tabserve"'
    nothing_deployed = oauth_server.get("/endpoints", headers=bearer("")).status_code
    assert nothing_deployed == 401


def test_a_valid_token_is_accepted_and_info_advertises_oauth_as_tabpy(
    oauth_server: Server, idp: IdP
) -> None:
    for kid in ("ec-1", "rsa-1"):
        answer = oauth_server.get("/info", headers=bearer(idp.token(kid, EVERYTHING)))
        assert answer.status_code == 200, answer.text
        assert answer.json()["versions"]["v1"]["features"]["authentication"] == {
            "required": True,
            "methods": {
                "oauth-jwt": {
                    "required_scopes": [ACCESS],
                    "endpoint_scopes": [QUERY, EVALUATE, DEPLOY],
                    "endpoint_scopes_enforced": True,
                }
            },
        }
    # "aud" may be a list holding ours; the scheme name is case-insensitive.
    token = idp.token("ec-1", EVERYTHING, aud=["other-api", AUDIENCE])
    answer = oauth_server.get("/status", headers={"Authorization": f"bearer {token}"})
    assert answer.status_code == 200


def _bad_tokens(idp: IdP) -> dict[str, str]:
    now = int(time.time())
    stranger = idp.new_key("stranger", publish=False)
    return {
        "expired": idp.token("ec-1", EVERYTHING, iat=now - 600, exp=now - 300),
        "wrong audience": idp.token("ec-1", EVERYTHING, aud="another-service"),
        "no audience": idp.token("ec-1", EVERYTHING, aud=None),
        "wrong issuer": idp.token("ec-1", EVERYTHING, iss="https://evil.example/"),
        "no issuer": idp.token("ec-1", EVERYTHING, iss=None),
        "alg none": idp.unsigned_token("ec-1", EVERYTHING),
        "HS256 keyed with the public key": idp.hmac_token("rsa-1", EVERYTHING),
        "wrong key": idp.token("ec-1", EVERYTHING, key=stranger),
        "RSA kid, EC signature": idp.token("rsa-1", EVERYTHING, key=idp.keys["ec-1"]),
        "missing required scope": idp.token("ec-1", f"{EVALUATE} {QUERY} {DEPLOY}"),
        "scope not a string": idp.token("ec-1", [ACCESS, EVALUATE]),  # type: ignore[arg-type]
        "no exp": idp.token("ec-1", EVERYTHING, exp=None),
        "no iat": idp.token("ec-1", EVERYTHING, iat=None),
        "issued in the future": idp.token("ec-1", EVERYTHING, iat=now + 3600, exp=now + 7200),
        "not yet valid": idp.token("ec-1", EVERYTHING, nbf=now + 3600),
        "tampered payload": _tampered(idp.token("ec-1", ACCESS)),
        "not a JWT": "not-a-jwt",
    }


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = EVERYTHING
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_every_bad_token_gets_401(oauth_server: Server, idp: IdP) -> None:
    for name, token in _bad_tokens(idp).items():
        for method, path, body in ROUTES:
            answer = call(oauth_server, method, path, body, token)
            assert answer.status_code == 401, (name, method, path, answer.text)
            assert answer.json() == UNAUTHORIZED
            challenge = answer.headers["WWW-Authenticate"]
            assert challenge == 'Bearer realm="tabserve", error="invalid_token"'
    log = oauth_server.log()
    for reason in ("Signature has expired", "Audience doesn't match", "Invalid issuer",
                   "alg value is not allowed", "Signature verification failed",
                   "lacks required scope(s) tabserve-tests:access"):  # fmt: skip
        assert reason in log
    assert _bad_tokens(idp)["expired"] not in log  # reasons are logged, never tokens


def test_a_missing_endpoint_scope_is_403_with_insufficient_scope(
    oauth_server: Server, idp: IdP
) -> None:
    token = idp.token("ec-1", ACCESS)  # valid, but no endpoint scope
    expectations = {
        ("GET", "/info"): 200,
        ("GET", "/status"): 200,
        ("GET", "/endpoints"): 200,
        ("GET", "/endpoints/add"): 404,
        ("GET", "/metrics"): 200,
        ("POST", "/evaluate"): EVALUATE,  # Tableau's probe too: a token needs the scope
        ("POST", "/endpoints"): DEPLOY,
        ("PUT", "/endpoints/add"): DEPLOY,
        ("DELETE", "/endpoints/add"): DEPLOY,
        ("GET", "/query/add"): QUERY,
        ("POST", "/query/add"): QUERY,
        ("GET", "/configurations/endpoint_upload_destination"): DEPLOY,
    }
    for method, path, body in ROUTES:
        expected = expectations[(method, path)]
        answer = call(oauth_server, method, path, body, token)
        if isinstance(expected, int):
            assert answer.status_code == expected, (method, path, answer.text)
            continue
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.headers["WWW-Authenticate"] == (
            f'Bearer realm="tabserve", error="insufficient_scope", scope="{expected}"'
        )
        assert answer.json()["message"] == "Token is missing a required endpoint scope."
        assert expected in answer.json()["info"]


def test_endpoint_scopes_allow_their_routes_and_tabpy_query_needs_both(
    oauth_server: Server, idp: IdP
) -> None:
    deployer = idp.token("ec-1", f"{ACCESS} {DEPLOY}")
    archive = base64.b64encode(cloudpickle.dumps(add)).decode()
    deployed = call(
        oauth_server, "POST", "/endpoints",
        {"name": "add", "type": "model", "archive": archive}, deployer,
    )  # fmt: skip
    assert deployed.status_code == 201, deployed.text
    destination = "/configurations/endpoint_upload_destination"
    upload = call(oauth_server, "GET", destination, None, deployer)
    assert upload.status_code == 200

    querier = idp.token("ec-1", f"{ACCESS} {QUERY}")
    answer = call(oauth_server, "POST", "/query/add", {"data": {"x": [1], "y": [2]}}, querier)
    assert answer.status_code == 200 and answer.json()["response"] == [3]

    script = {"script": "return tabpy.query('add', _arg1, _arg1)['response']",
              "data": {"_arg1": [1, 2]}}  # fmt: skip
    evaluator = idp.token("ec-1", f"{ACCESS} {EVALUATE}")
    assert call(oauth_server, "POST", "/evaluate", {"script": "return 7", "data": {}},
                evaluator).json() == 7  # fmt: skip
    refused = call(oauth_server, "POST", "/evaluate", script, evaluator)
    assert refused.status_code == 500
    assert "tabpy.query() needs the 'tabpy:query' scope" in refused.json()["info"]
    both = idp.token("ec-1", f"{ACCESS} {EVALUATE} {QUERY}")
    answer = call(oauth_server, "POST", "/evaluate", script, both)
    assert answer.status_code == 200 and answer.json() == [2, 4]


def test_log_user_names_the_subject_in_the_access_log(oauth_server: Server, idp: IdP) -> None:
    token = idp.token("ec-1", ACCESS, sub="carol@example.com")
    assert oauth_server.get("/status", headers=bearer(token)).status_code == 200
    deadline = time.monotonic() + 5
    while "carol@example.com" not in oauth_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "auth_user=carol@example.com" in oauth_server.log().replace('"', "")


# --- key rotation, and the JWKS fetch off the event loop ------------------------------------


def test_rotated_keys_unknown_kids_and_a_slow_jwks(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    idp = IdP(tmp_path)  # its own: this test rotates the keys
    try:
        _rotate(server_factory, idp)
    finally:
        idp.close()


def _rotate(server_factory: ServerFactory, idp: IdP) -> None:
    idp.new_key("rot-a")
    server = server_factory(env={"SSL_CERT_FILE": str(idp.ca_file)}, **tabpy_oauth_config(idp))
    assert server.get("/info", headers=bearer(idp.token("rot-a"))).status_code == 200
    fetched = idp.fetches

    # The IdP rotates: rot-b replaces rot-a. rot-b's first token makes one fetch, which is
    # slow; meanwhile the event loop keeps answering.
    idp.new_key("rot-b", publish=False)
    idp.publish("rot-b")
    idp.delay = 4.0
    result: dict[str, int] = {}

    def first_rot_b() -> None:
        result["status"] = server.get("/info", headers=bearer(idp.token("rot-b"))).status_code

    thread = threading.Thread(target=first_rot_b)
    thread.start()
    time.sleep(0.5)  # the fetch has started
    started = time.monotonic()
    assert server.get("/health/live").status_code == 200
    assert time.monotonic() - started < 2.0  # not stuck behind the 4 s fetch
    assert thread.is_alive()  # the token's request is still waiting for it
    thread.join(timeout=30)
    idp.delay = 0.0
    assert result["status"] == 200
    assert idp.fetches == fetched + 1

    # A token of the rotated-out key: one more fetch finds it gone.
    assert server.get("/info", headers=bearer(idp.token("rot-a"))).status_code == 401
    assert idp.fetches == fetched + 2
    # Made-up kids cannot make it fetch again (rate limit), and still get 401.
    for number in range(10):
        forged = idp.token(f"made-up-{number}", key=idp.keys["rot-b"])
        assert server.get("/info", headers=bearer(forged)).status_code == 401
    assert idp.fetches == fetched + 2
    assert server.get("/info", headers=bearer(idp.token("rot-b"))).status_code == 200


# --- Basic and Bearer side by side ---------------------------------------------------------


def test_basic_keeps_working_beside_bearer(
    server_factory: ServerFactory, idp: IdP, tmp_path_factory: pytest.TempPathFactory
) -> None:
    passwords = tmp_path_factory.mktemp("both") / "passwords.txt"
    passwords.write_text(f"user1 {hash_password('user1', 'P@ssw0rd')}\n")
    passwords.chmod(0o600)
    server = server_factory(
        env={"SSL_CERT_FILE": str(idp.ca_file)},
        TABPY_PWD_FILE=str(passwords),
        **tabpy_oauth_config(idp, TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES="true"),
    )
    assert "auth on (basic, oauth)" in server.log()
    info = server.get("/info", auth=("user1", "P@ssw0rd"))
    assert info.status_code == 200
    methods = info.json()["versions"]["v1"]["features"]["authentication"]["methods"]
    assert list(methods) == ["basic-auth", "oauth-jwt"]
    assert methods["oauth-jwt"]["required_scopes"] == []
    probe = {"script": "return int(1)", "data": {"_arg1": [4]}}
    assert server.post("/evaluate", json=probe, auth=("user1", "P@ssw0rd")).json() == 1
    token = idp.token("ec-1", EVALUATE)
    assert server.post("/evaluate", json=probe, headers=bearer(token)).json() == 1
    # As in TabPy: no credentials, or not Bearer, is Basic's 401.
    missing = server.get("/info")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Basic realm="tabserve"'
    wrong = server.get("/info", auth=("user1", "nope"))
    assert wrong.status_code == 401
    bad_token = server.get("/info", headers=bearer(idp.token("ec-1", aud="x")))
    assert bad_token.status_code == 401
    assert bad_token.headers["WWW-Authenticate"].startswith("Bearer ")


# --- Arrow Flight with tokens ---------------------------------------------------------------


def test_flight_takes_tokens_and_keeps_each_subjects_tables_apart(
    server_factory: ServerFactory, idp: IdP
) -> None:
    """Flight asks the same authenticator: a token works there, its scopes count, and its
    tables are its subject's, though a token's user has no name (TABPY_OAUTH_LOG_USER off)."""
    port = free_port()
    server = server_factory(
        env={"SSL_CERT_FILE": str(idp.ca_file)},
        TABPY_ARROW_ENABLE="true",
        TABPY_ARROWFLIGHT_PORT=str(port),
        **tabpy_oauth_config(idp, TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES="true"),
    )
    client = fl.connect(f"grpc+tcp://localhost:{port}")

    def as_token(token: str) -> fl.FlightCallOptions:
        return fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])

    alice = as_token(idp.token("ec-1", EVALUATE, sub="alice@example.com"))
    alice_again = as_token(idp.token("rsa-1", EVALUATE, sub="alice@example.com"))
    bob_token = idp.token("ec-1", EVALUATE, sub="bob@example.com")
    no_sub = as_token(idp.token("ec-1", EVALUATE, sub=None))
    table = pa.table({"x": [1.0, 2.0, 3.0]})

    def put(options: fl.FlightCallOptions, path: str) -> None:
        writer, _ = client.do_put(fl.FlightDescriptor.for_path(path), table.schema, options)
        writer.write_table(table)
        writer.close()

    def listed(options: fl.FlightCallOptions) -> list[str]:
        return [i.descriptor.path[0].decode() for i in client.list_flights(b"", options)]

    with pytest.raises(fl.FlightUnauthenticatedError):
        listed(as_token(idp.token("ec-1", EVALUATE, aud="another-service")))
    with pytest.raises(fl.FlightUnauthorizedError, match="tabpy:evaluate"):
        put(as_token(idp.token("ec-1", QUERY, sub="alice@example.com")), "refused")
    put(alice, "alice-table")
    assert listed(alice_again) == ["alice-table"]  # another token of the same subject
    assert listed(as_token(bob_token)) == [] and listed(no_sub) == []
    script = "_arg1['y'] = _arg1['x'] * 2\nreturn _arg1"
    body = {"script": script, "dataPath": "alice-table"}
    refused = call(server, "POST", "/evaluate", body, bob_token)
    assert refused.status_code == 500 and "Flight not found" in refused.json()["info"]
    # tabpy.query() in a script needs the query scope on this path too.
    querying = {"script": "return tabpy.query('add', 1, 2)", "dataPath": "alice-table"}
    refused = call(server, "POST", "/evaluate", querying, idp.token("ec-1", EVALUATE,
                   sub="alice@example.com"))  # fmt: skip
    assert refused.status_code == 500
    assert "tabpy.query() needs the 'tabpy:query' scope" in refused.json()["info"]
    put(alice, "alice-table")  # the failed script took it out of the store
    answer = call(server, "POST", "/evaluate", body, idp.token("ec-1", EVALUATE,
                  sub="alice@example.com"))  # fmt: skip
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputDataPath"]
    assert output not in listed(as_token(bob_token))
    ticket = client.get_flight_info(fl.FlightDescriptor.for_path(output), alice).endpoints[0]
    assert client.do_get(ticket.ticket, alice).read_all().column("y").to_pylist() == [2, 4, 6]
    client.close()


# --- configurations that must not start -----------------------------------------------------


def _start(tmp_path: Path, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "tabpy.conf"
    lines = ["[TabPy]", f"TABPY_STATE_PATH = {tmp_path / 'state'}", "TABPY_PORT = 0",
             "TABSERVE_WORKERS = 1", "TABSERVE_WORKER_USER = root"]  # fmt: skip
    lines += [f"{key} = {value}" for key, value in settings.items()]
    config.write_text("\n".join(lines) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "tabserve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"TABPY_OAUTH_ISSUER": ""}, "TABPY_OAUTH_ISSUER is not set"),
        ({"TABPY_OAUTH_JWKS_URI": ""}, "TABPY_OAUTH_JWKS_URI is not set"),
        ({"TABPY_OAUTH_ISSUER": "http://idp.example/"}, "TABPY_OAUTH_ISSUER"),
        ({"TABPY_OAUTH_JWKS_URI": "http://127.0.0.1:1/jwks.json"}, "must be an https:// URL"),
        ({"TABPY_OAUTH_AUDIENCE": ""}, "neither TABPY_OAUTH_AUDIENCE nor"),
        ({"TABPY_OAUTH_QUERY_SCOPE": "two words"}, "TABPY_OAUTH_QUERY_SCOPE"),
        ({"TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS": "false"}, "resolves to non-public addresses"),
        ({"TABPY_OAUTH_ENABLD": "true"}, "did you mean TABPY_OAUTH_ENABLED?"),
    ],
)
def test_unsafe_oauth_configs_stop_the_start_with_one_line(
    tmp_path: Path, idp: IdP, change: dict[str, str], expected: str
) -> None:
    settings = {**tabpy_oauth_config(idp), **change}
    finished = _start(tmp_path, settings)
    assert finished.returncode != 0
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], finished.stderr
    assert lines[0].startswith("tabserve: ")
