"""API keys over HTTP, on real servers: two replicas sharing one store, for both backends
(the state directory's tabserve.db and PostgreSQL). User keys act as their user, endpoint
keys reach one endpoint, revocation reaches the other replica within a second, and the
CLI (`tabserve key`) and `/keys` manage the same keys."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import requests
from pg import PostgresServer

from helpers import Server
from tabserve.cli import main

ADMIN = ("admin", "keys-admin-pass")
READER = ("reader", "keys-reader-pass")
DEPLOYER = ("deployer", "keys-deployer-pass")  # manage only


@dataclass
class Replicas:
    location: str  # the store, as `tabserve key --store` takes it
    a: Server
    b: Server


def _deploy_body(name: str, factor: int) -> dict[str, object]:
    def times(x: list[int]) -> list[int]:
        return [factor * v for v in x]

    archive = base64.b64encode(cloudpickle.dumps(times)).decode("ascii")
    return {"name": name, "type": "model", "archive": archive}


@pytest.fixture(scope="module", params=["statedir", "postgresql"])
def replicas(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp(f"keys-{request.param}")
    if request.param == "statedir":
        location = str(workdir / "state")
        config = {"TABPY_STATE_PATH": location}
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        location = pg.fresh_database(f"keys_{workdir.name[-10:].lower()}")
        config = {"TABSERVE_STORE": location}
    for name, password, permissions in (
        (*ADMIN, "all"), (*READER, "query"), (*DEPLOYER, "manage"),
    ):  # fmt: skip
        assert main(["user", "add", "-u", name, "-p", password, "--permissions", permissions,
                     "--store", location]) == 0  # fmt: skip
    # No slow-down of repeated 401s: this module sends many bad keys on purpose.
    config |= {"TABSERVE_USERS": "store", "TABSERVE_WORKERS": "1", "TABSERVE_AUTH_MAX_DELAY": "0"}
    servers: list[Server] = []
    try:
        for replica in ("a", "b"):
            (workdir / replica).mkdir()
            servers.append(Server(workdir / replica, config, {}, auth=ADMIN))
        a, b = servers
        for name, factor in (("triple", 3), ("double", 2)):
            assert a.post("/endpoints", json=_deploy_body(name, factor)).status_code == 201
        _eventually(lambda: b.get("/endpoints/double").status_code == 200)
        yield Replicas(location, a, b)
    finally:
        for server in servers:
            server.stop()


def _key(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


def _with_key(server: Server, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
    return server.request(method, path, auth=None, headers=_key(key), **kwargs)


def _create(server: Server, **whose: str) -> dict[str, Any]:
    answer = server.post("/keys", json=whose)
    assert answer.status_code == 201, answer.text
    key: dict[str, Any] = answer.json()["key"]
    assert answer.headers["Location"] == f"/keys/{key['id']}"
    assert key["secret"].startswith(f"tsk_{key['id']}_")
    return key


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


QUERY = {"json": {"data": {"x": [1, 2]}}}


def test_an_endpoint_key_reaches_its_endpoint_and_nothing_else(replicas: Replicas) -> None:
    key = _create(replicas.a, endpoint="triple")
    assert key["kind"] == "endpoint" and key["endpoint"] == "triple" and key["user"] is None
    secret = key["secret"]
    for server in (replicas.a, replicas.b):  # the other replica knows it too
        answer = _with_key(server, "POST", "/query/triple", secret, **QUERY)
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] == [3, 6]
        assert _with_key(server, "GET", "/query/triple", secret, **QUERY).status_code == 200
    refused = [
        ("POST", "/query/double", QUERY),
        ("POST", "/evaluate", {"json": {"script": "return 1", "data": {}}}),
        (
            "POST",
            "/evaluate",
            {"json": {"script": "return int(1)", "data": {}}},
        ),  # not even Tableau's test
        ("GET", "/info", {}),
        ("GET", "/endpoints", {}),
        ("GET", "/endpoints/triple", {}),
        ("DELETE", "/endpoints/triple", {}),
        ("POST", "/endpoints", {"json": _deploy_body("sneaky", 1)}),
        ("GET", "/status", {}),
        ("GET", "/keys", {}),
        ("POST", "/keys", {"json": {"endpoint": "double"}}),
        ("DELETE", f"/keys/{key['id']}", {}),
        ("GET", "/configurations/endpoint_upload_destination", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, kwargs in refused:
        answer = _with_key(replicas.a, method, path, secret, **kwargs)
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["message"] == "This API key may only call one endpoint."
    assert replicas.a.get("/endpoints/triple").status_code == 200  # still there
    assert replicas.a.get(f"/keys/{key['id']}").json()["key"]["revoked"] is None


def test_a_user_key_has_exactly_its_users_rights(replicas: Replicas, capsys) -> None:  # type: ignore[no-untyped-def]
    # The reader's key from the CLI, the admin's over HTTP.
    assert main(["key", "create", "--user", "Reader", "--store", replicas.location]) == 0
    captured = capsys.readouterr()
    reader_key = captured.out.strip()
    assert reader_key.startswith("tsk_") and "\n" not in reader_key
    assert "user key for 'reader'" in captured.err
    admin_key = _create(replicas.a, user="admin")["secret"]
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/info", {}),
        ("GET", "/endpoints", {}),
        ("POST", "/query/triple", QUERY),
        ("POST", "/evaluate", {"json": {"script": "return 1", "data": {}}}),
        ("POST", "/evaluate", {"json": {"script": "return int(1)", "data": {}}}),
        ("POST", "/endpoints", {"json": {"name": "nothing", "type": "model"}}),
        ("DELETE", "/endpoints/no-such-endpoint", {}),
        ("GET", "/keys", {}),
    ]
    for credentials, key in ((READER, reader_key), (ADMIN, admin_key)):
        for method, path, kwargs in calls:
            by_password = replicas.b.request(method, path, auth=credentials, **kwargs)
            by_key = _with_key(replicas.b, method, path, key, **kwargs)
            assert by_key.status_code == by_password.status_code, (credentials[0], method, path)
            assert by_key.json() == by_password.json() or method == "POST", (method, path)

    def evaluates() -> int:
        body = {"script": "return 1", "data": {}}
        return _with_key(replicas.b, "POST", "/evaluate", reader_key, json=body).status_code

    assert evaluates() == 403
    # The user's permissions as they are now: a change applies to the key too.
    location = replicas.location
    update = ["user", "update", "-u", "reader", "--keep-password", "--store", location]
    assert main([*update, "--permissions", "query,evaluate"]) == 0
    try:
        _eventually(lambda: evaluates() == 200)
    finally:
        assert main([*update, "--permissions", "query"]) == 0
    _eventually(lambda: evaluates() == 403)


def _refused_within_a_second(server: Server, key: str, revoked_at: float) -> None:
    """The first request sent after ``revoked_at`` that is refused left within 1 s of it.

    /info costs no worker: an endpoint key gets 403 there while it is valid, 401 once not.
    """
    while True:
        sent = time.monotonic()
        status = _with_key(server, "GET", "/info", key).status_code
        if status == 401:
            assert sent - revoked_at < 1.0, f"still accepted {sent - revoked_at:.2f} s after"
            return
        assert status == 403
        assert sent - revoked_at < 10, "never refused"  # liveness bound; the 1 s is above


def test_a_revoked_key_is_refused_on_every_replica_within_a_second(replicas: Replicas) -> None:
    key = _create(replicas.a, endpoint="triple")
    for server in (replicas.a, replicas.b):  # both remember it as good
        assert _with_key(server, "POST", "/query/triple", key["secret"], **QUERY).ok
    revoked = replicas.a.request("DELETE", f"/keys/{key['id']}")
    revoked_at = time.monotonic()
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["key"]["revoked"] is not None
    # The replica that revoked it refuses it at once; the other within a second.
    assert _with_key(replicas.a, "POST", "/query/triple", key["secret"], **QUERY).status_code == 401
    _refused_within_a_second(replicas.b, key["secret"], revoked_at)
    answer = _with_key(replicas.b, "POST", "/query/triple", key["secret"], **QUERY)
    assert answer.status_code == 401
    assert answer.json() == {"message": "Invalid credentials provided.",
                             "info": "Unauthorized request."}  # fmt: skip
    # Revoking again keeps the first time.
    again = replicas.b.request("DELETE", f"/keys/{key['id']}")
    assert again.status_code == 200 and again.json() == revoked.json()


def test_a_key_revoked_with_the_cli_is_refused_within_a_second(replicas: Replicas, capsys) -> None:  # type: ignore[no-untyped-def]
    key = _create(replicas.b, endpoint="double")
    for server in (replicas.a, replicas.b):
        assert _with_key(server, "POST", "/query/double", key["secret"], **QUERY).ok
    assert main(["key", "revoke", key["id"], "--store", replicas.location]) == 0
    revoked_at = time.monotonic()
    for server in (replicas.a, replicas.b):
        _refused_within_a_second(server, key["secret"], revoked_at)
    assert main(["key", "list", "--store", replicas.location]) == 0
    listing = capsys.readouterr().out
    line = next(line for line in listing.splitlines() if line.startswith(key["id"]))
    assert line.split()[1:3] == ["endpoint", "double"] and line.endswith("revoked")
    assert key["secret"] not in listing
    assert main(["key", "revoke", "0123456789abcdef", "--store", replicas.location]) == 1
    assert "no API key has the id" in capsys.readouterr().err


def test_keys_are_listed_without_secrets_and_record_their_last_use(replicas: Replicas) -> None:
    key = _create(replicas.a, endpoint="double")
    assert key["last_used"] is None
    started = time.time()
    assert _with_key(replicas.b, "POST", "/query/double", key["secret"], **QUERY).ok

    def shown_key() -> dict[str, Any]:
        key_shown: dict[str, Any] = replicas.a.get(f"/keys/{key['id']}").json()["key"]
        return key_shown

    _eventually(lambda: shown_key()["last_used"] is not None)  # written in the background
    shown = shown_key()
    assert started - 1 <= shown["last_used"] <= time.time()
    assert "secret" not in shown
    # Not a write per request: used again (after the key was surely re-read, on both
    # replicas), the recorded time stays until it is a minute old.
    time.sleep(0.6)
    for server in (replicas.a, replicas.b):
        assert _with_key(server, "POST", "/query/double", key["secret"], **QUERY).ok
    time.sleep(0.3)  # time for a write in the background, were there one
    assert shown_key()["last_used"] == shown["last_used"]
    listing = replicas.b.get("/keys")
    assert listing.status_code == 200
    keys = listing.json()["keys"]
    assert key["id"] in [k["id"] for k in keys]
    assert key["secret"] not in listing.text and "secret" not in listing.text
    # The store holds only a hash: the secret is nowhere in it.
    if not replicas.location.startswith("postgresql://"):
        database = Path(replicas.location, "tabserve.db").read_bytes()
        assert key["secret"].encode() not in database


def test_a_key_in_the_query_string_is_for_result_downloads_only(replicas: Replicas) -> None:
    """A key in a URL leaks into histories, proxy logs and Referer headers: it is taken
    only where nothing else can be sent, a result download. Elsewhere it is a 401 that says
    so, for every verb, whatever the key may do with a header."""
    key = _create(replicas.a, endpoint="triple")["secret"]
    reader = _create(replicas.a, user="reader")["secret"]
    base = replicas.b
    for method, path, secret, extra in (
        ("POST", "/query/triple", key, QUERY),
        ("GET", "/query/triple", key, QUERY),
        ("GET", "/info", key, {}),
        ("GET", "/endpoints", reader, {}),
        ("GET", "/jobs", reader, {}),
        ("GET", "/jobs/0123", reader, {}),
        ("DELETE", "/jobs/0123", reader, {}),
        ("GET", "/query_results/0123", reader, {}),
        ("POST", "/query_results/0123.csv", reader, {}),
        ("DELETE", "/query_results/0123.json", reader, {}),
    ):
        answer = base.request(method, f"{path}?api_key={secret}", auth=None, **extra)
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.json()["message"] == "API keys are not accepted in the URL here"
        assert "Authorization: Key" in answer.json()["info"]
        assert answer.headers["WWW-Authenticate"].startswith("Basic ")
    # The same keys in the header are fine there.
    assert _with_key(base, "POST", "/query/triple", key, **QUERY).json()["response"] == [3, 6]
    assert _with_key(base, "GET", "/endpoints", reader).status_code == 200
    # On a download, the key in the URL authenticates: an unknown result is a 404, not 401.
    for path in ("/query_results/0123.csv", "/query_results/0123.json"):
        answer = base.request("GET", f"{path}?api_key={reader}", auth=None)
        assert answer.status_code == 404, (path, answer.text)
    # The key is not written to the access log.
    assert reader not in base.log() and key not in base.log()
    download = "/query_results/0123.csv"
    twice = base.request("GET", f"{download}?api_key={reader}&api_key={reader}", auth=None)
    assert twice.status_code == 400 and twice.json()["message"] == "Credentials sent twice"
    both = base.request("GET", f"{download}?api_key={reader}", auth=None, headers=_key(reader))
    assert both.status_code == 400
    with_basic = base.request("GET", f"{download}?api_key={reader}", auth=READER)
    assert with_basic.status_code == 400
    nonsense = base.request("GET", f"{download}?api_key=nonsense", auth=None)
    assert nonsense.status_code == 401
    assert nonsense.json()["message"] == "Invalid credentials provided."


def test_bad_keys_and_bad_requests_get_clear_4xx(replicas: Replicas) -> None:
    server = replicas.a
    unknown_but_well_formed = "tsk_0123456789abcdef_" + "A" * 43
    for header in (
        "Key",
        "Key ",
        "Key nonsense",
        "Key tsk_0123_short",
        "key " + unknown_but_well_formed,
        "Key " + unknown_but_well_formed + "x",
    ):
        answer = server.request("GET", "/endpoints", auth=None, headers={"Authorization": header})
        assert answer.status_code == 401, (header, answer.text)
        assert answer.json()["message"] == "Invalid credentials provided."
        assert answer.headers["WWW-Authenticate"].startswith("Basic ")
    # A real key's id with another secret is not that key.
    real = _create(server, endpoint="triple")
    forged = real["secret"][:-1] + ("B" if real["secret"][-1] != "B" else "C")
    assert _with_key(server, "POST", "/query/triple", forged, **QUERY).status_code == 401
    for path in ("/keys/0123456789abcdef", "/keys/not-a-key-id", "/keys/" + "f" * 200):
        for method in ("GET", "DELETE"):
            answer = server.request(method, path)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["message"] == "Unknown API key"
    for body, status in (
        ({}, 400),
        ({"user": "admin", "endpoint": "triple"}, 400),
        ({"user": ""}, 400),
        ({"user": 3}, 400),
        ({"endpoint": "triple", "expires": 5}, 400),
        ({"user": "nobody"}, 404),
        ({"endpoint": "no-such-endpoint"}, 404),
    ):
        answer = server.post("/keys", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert set(answer.json()) == {"message", "info"}
    assert server.post("/keys", data=b"[1]").status_code == 400
    # Only manage users, and never a key with more rights than the caller's.
    assert server.post("/keys", json={"endpoint": "triple"}, auth=READER).status_code == 403
    assert server.get("/keys", auth=READER).status_code == 403
    too_much = server.post("/keys", json={"user": "admin"}, auth=DEPLOYER)
    assert too_much.status_code == 403, too_much.text
    assert server.post("/keys", json={"user": "deployer"}, auth=DEPLOYER).status_code == 201
    assert server.post("/keys", json={"endpoint": "triple"}, auth=DEPLOYER).status_code == 201


def test_cli_refuses_unknown_users_and_endpoints(replicas: Replicas, capsys) -> None:  # type: ignore[no-untyped-def]
    location = replicas.location
    assert main(["key", "create", "--user", "nobody", "--store", location]) == 1
    assert "no user 'nobody'" in capsys.readouterr().err
    assert main(["key", "create", "--endpoint", "nothing", "--store", location]) == 1
    assert "no endpoint 'nothing'" in capsys.readouterr().err
    assert main(["key", "create", "--endpoint", "triple", "--store", location]) == 0
    key = capsys.readouterr().out.strip()
    assert _with_key(replicas.b, "POST", "/query/triple", key, **QUERY).ok


def test_with_authentication_off_keys_are_refused_like_basic_credentials(
    server: Server,
) -> None:
    """The shared server runs without authentication, as TabPy by default."""
    key = "tsk_0123456789abcdef_" + "A" * 43
    for path in ("/info", "/keys", "/query/anything"):
        answer = server.request("GET", path, auth=None, headers=_key(key))
        assert answer.status_code == 406, (path, answer.text)
        assert answer.json()["info"] == "Not Acceptable"
        answer = server.request("GET", f"{path}?api_key={key}", auth=None)
        assert answer.status_code == 406, (path, answer.text)
    assert server.request("GET", "/info", auth=None, headers={"Authorization": "Key"}
                          ).status_code == 406  # fmt: skip
    for method, path in (("GET", "/keys"), ("POST", "/keys"), ("GET", "/keys/0123456789abcdef"),
                         ("DELETE", "/keys/0123456789abcdef")):  # fmt: skip
        answer = server.request(method, path, auth=None, json={"endpoint": "x"})
        assert answer.status_code == 404, (method, path, answer.text)
        assert set(answer.json()) == {"message", "info"}
    assert server.get("/info", auth=None).status_code == 200  # nothing else changed


def _job_done(server: Server, job_id: str, **kwargs: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        answer = server.request("GET", f"/jobs/{job_id}", **kwargs)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()["job"]
        if job["status"] >= 3:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_an_endpoint_key_reads_only_its_endpoints_jobs_and_results(replicas: Replicas) -> None:
    secret = _create(replicas.a, endpoint="triple")["secret"]
    asynchronous = {"Prefer": "respond-async", **_key(secret)}
    answer = replicas.a.request("POST", "/query/triple", auth=None, headers=asynchronous, **QUERY)
    assert answer.status_code == 202, answer.text
    own = answer.json()["job"]["id"]
    for server in (replicas.a, replicas.b):
        job = _job_done(server, own, auth=None, headers=_key(secret))
        assert job["status"] == 3, job
        result = job["query_result_id"]
        data = _with_key(server, "GET", f"/query_results/{result}", secret)
        assert data.json()["query_result"]["data"] == [3, 6]
        # A download link carries the key in the URL.
        link = server.request("GET", f"/query_results/{result}.csv?api_key={secret}", auth=None)
        assert link.status_code == 200 and link.text.splitlines() == ["value", "3", "6"]
        assert link.headers["Cache-Control"] == "no-store"
        assert link.headers["Referrer-Policy"] == "no-referrer"
        # A spreadsheet may look first: HEAD answers the headers only.
        head = server.request("HEAD", f"/query_results/{result}.json?api_key={secret}", auth=None)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Disposition"].endswith(f'-{result}.json"')
        # Everything else about the job takes the key in the header only.
        url_key = server.request("GET", f"/jobs/{own}?api_key={secret}", auth=None)
        assert url_key.status_code == 401
    listed = _with_key(replicas.a, "GET", "/jobs", secret).json()["jobs"]
    assert [job["id"] for job in listed] == [own]
    # Reading only: no cancelling, not even its own.
    assert _with_key(replicas.a, "DELETE", f"/jobs/{own}", secret).status_code == 403
    # Another endpoint's job, or another caller's on its endpoint: as if it did not exist.
    for name in ("double", "triple"):
        other = replicas.a.post(f"/query/{name}", headers={"Prefer": "respond-async"}, **QUERY)
        other_id = other.json()["job"]["id"]
        done = _job_done(replicas.a, other_id)
        assert _with_key(replicas.a, "GET", f"/jobs/{other_id}", secret).status_code == 404
        path = f"/query_results/{done['query_result_id']}"
        assert _with_key(replicas.a, "GET", path, secret).status_code == 404
        assert replicas.a.get(path).status_code == 200  # the manager sees it
