"""Basic authentication over HTTP: TabPy's 401/406 matrix, permissions, reloads, clients.

The matrix and permissions run against the app in process; reloads and start-up failures
against real servers and the command line."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import requests
from pg import PostgresServer
from tabpy.tabpy_tools.client import Client

from helpers import AppFactory, InProcessServer, Server, ServerFactory
from tabserve.store.backends import open_store
from tabserve.store.passwords import hash_password
from tabserve.store.state_dir import ensure_state_dir
from tabserve.store.transfer import users_from_password_file

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIXTURES = Path(__file__).parent / "fixtures"
UNAUTHORIZED = {"message": "Invalid credentials provided.", "info": "Unauthorized request."}
NOT_ACCEPTABLE = {
    "message": "Username or password provided when authentication not available.",
    "info": "Not Acceptable",
}
VALID = ("user1", "P@ssw0rd")  # from TabPy's own tabpy-user, in tests/fixtures
BAD_USER = ("nobody", "P@ssw0rd")
BAD_PASSWORD = ("user1", "wrong-password")


def add(x: list[float], y: list[float]) -> list[float]:
    return [a + b for a, b in zip(x, y, strict=True)]


def pickled(obj: object) -> str:
    return base64.b64encode(cloudpickle.dumps(obj)).decode()


def write_password_file(path: Path) -> Path:
    """TabPy's own file (user1, user2) plus users with permissions and a ':' password."""
    text = (FIXTURES / "tabpy_passwords.txt").read_text()
    text += f"colon {hash_password('colon', 'a:b:c')}\n"
    text += f"evaluser {hash_password('evaluser', 'ev-pass', 'tabpy')} evaluate\n"
    text += f"queryuser {hash_password('queryuser', 'q-pass')} query\n"
    text += f"deployer {hash_password('deployer', 'd-pass')} manage\n"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_password_file(tmp_path_factory.mktemp("auth") / "passwords.txt")


def users_in_a_store(
    kind: str, password_file: Path, workdir: Path, request: pytest.FixtureRequest
) -> dict[str, str]:
    """The password file's users, hashes and permissions as they are, put into a store of
    ``kind``; the settings that make a server take its users from there."""
    if kind == "statedir":
        location = str(workdir / "state")
        ensure_state_dir(Path(location))
        config = {"TABPY_STATE_PATH": location}
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        location = pg.fresh_database(f"auth_api_{workdir.name[-8:].lower()}")
        config = {"TABSERVE_STORE": location}
    store = open_store(location, cache=workdir / "cache")
    try:
        store.migrate()
        for user in users_from_password_file(password_file).values():
            store.put_user(user, create=True)
    finally:
        store.close()
    return {**config, "TABSERVE_USERS": "store"}


# The same matrix and permission tests whichever way users are kept: TabPy's password file,
# or a store (issue 11): the state directory's tabserve.db, or PostgreSQL.
@pytest.fixture(scope="module", params=["file", "statedir", "postgresql"])
def auth_server(
    app_factory: AppFactory,
    password_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> InProcessServer:
    if request.param == "file":
        users = {"TABPY_PWD_FILE": str(password_file)}
    else:
        workdir = tmp_path_factory.mktemp(f"users_{request.param}")
        users = users_in_a_store(request.param, password_file, workdir, request)
    # No slow-down here: the matrix fails on purpose many times from one address.
    server = app_factory(**users, TABSERVE_AUTH_MAX_DELAY="0", TABPY_EVALUATE_TIMEOUT="20")
    answer = server.post(
        "/endpoints",
        json={"name": "add", "type": "model", "archive": pickled(add)},
        auth=VALID,
    )
    assert answer.status_code == 201, answer.text
    return server


# The routes of TabPy's auth unit tests, with a request that succeeds when authenticated.
ROUTES = [
    ("GET", "/info", None, 200),
    ("POST", "/evaluate", {"script": "return _arg1", "data": {"_arg1": [1]}}, 200),
    ("GET", "/endpoints", None, 200),
    ("GET", "/endpoints/add", None, 200),
    ("GET", "/status", None, 200),
    ("POST", "/query/add", {"data": {"x": [1], "y": [2]}}, 200),
    ("GET", "/configurations/endpoint_upload_destination", None, 200),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _, _ in ROUTES]


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "credentials", [None, BAD_USER, BAD_PASSWORD], ids=["no creds", "bad user", "bad password"]
)
def test_auth_on_refuses_missing_or_wrong_credentials(
    auth_server: InProcessServer,
    method: str,
    path: str,
    body: object,
    ok: int,
    credentials: tuple[str, str] | None,
) -> None:
    answer = auth_server.request(method, path, json=body, auth=credentials)
    assert answer.status_code == 401
    assert answer.json() == UNAUTHORIZED
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="tabserve"'
    assert answer.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES, ids=ROUTE_IDS)
def test_auth_on_accepts_valid_credentials(
    auth_server: InProcessServer, method: str, path: str, body: object, ok: int
) -> None:
    answer = auth_server.request(method, path, json=body, auth=VALID)
    assert answer.status_code == ok, answer.text


def test_info_advertises_basic_auth(auth_server: InProcessServer) -> None:
    features = auth_server.get("/info", auth=VALID).json()["versions"]["v1"]["features"]
    assert features["authentication"] == {"required": True, "methods": {"basic-auth": {}}}


def test_401_body_is_tabpys_bytes(auth_server: InProcessServer) -> None:
    answer = auth_server.get("/info")
    assert answer.content == (
        b'{"message": "Invalid credentials provided.", "info": "Unauthorized request."}'
    )


def test_public_paths_need_no_credentials(auth_server: InProcessServer) -> None:
    page = auth_server.get("/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert auth_server.get("/unicorn").status_code == 404
    preflight = auth_server.request("OPTIONS", "/evaluate")
    assert preflight.status_code == 200


def test_password_with_colon_authenticates(auth_server: InProcessServer) -> None:
    assert auth_server.get("/info", auth=("colon", "a:b:c")).status_code == 200
    assert auth_server.get("/info", auth=("colon", "a:b")).status_code == 401


def test_scheme_name_is_case_insensitive(auth_server: InProcessServer) -> None:
    token = base64.b64encode(b"user1:P@ssw0rd").decode()
    for scheme in ("basic", "BASIC"):
        answer = auth_server.get("/info", headers={"Authorization": f"{scheme} {token}"})
        assert answer.status_code == 200


def test_user_names_are_case_insensitive(auth_server: InProcessServer) -> None:
    assert auth_server.get("/status", auth=("USER1", "P@ssw0rd")).status_code == 200


def test_401_with_a_body_keeps_the_connection_usable(auth_server: InProcessServer) -> None:
    with requests.Session() as session:
        big = {"script": "return 1", "data": {"_arg1": ["x" * 1000] * 200}}
        first = session.post(auth_server.url + "/evaluate", json=big, timeout=30)
        assert first.status_code == 401
        second = session.post(auth_server.url + "/evaluate", json=big, auth=VALID, timeout=30)
        assert second.status_code == 200


def test_failures_are_logged_with_reason_and_without_secrets(auth_server: InProcessServer) -> None:
    auth_server.get("/status", auth=("user1", "SecretGuess-42"))
    auth_server.get("/status", auth=("ghost", "AnotherSecret-43"))
    auth_server.get("/status", headers={"Authorization": "Bearer TokenValue-44"})
    auth_server.get("/status")
    deadline = time.monotonic() + 10
    log = auth_server.log()
    while "unsupported scheme" not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = auth_server.log()
    assert "wrong password for user 'user1'" in log
    assert "unknown user 'ghost'" in log
    assert "unsupported scheme 'Bearer'" in log
    assert "no Authorization header" in log
    for secret in ("SecretGuess-42", "AnotherSecret-43", "TokenValue-44", "P@ssw0rd"):
        assert secret not in log


# --- permissions ---------------------------------------------------------------------------------

EVALUATE_BODY = {"script": "return _arg1", "data": {"_arg1": [5]}}
CONNECTION_TEST_BODY = {"script": "return int(1)", "data": {"_arg1": [4]}}


def test_evaluate_only_user(auth_server: InProcessServer) -> None:
    user = ("evaluser", "ev-pass")
    assert auth_server.post("/evaluate", json=EVALUATE_BODY, auth=user).json() == [5]
    # tabpy.query inside /evaluate needs only the evaluate permission.
    script = "return tabpy.query('add', _arg1, _arg2)['response']"
    answer = auth_server.post(
        "/evaluate", json={"script": script, "data": {"_arg1": [1], "_arg2": [2]}}, auth=user
    )
    assert answer.status_code == 200 and answer.json() == [3]
    refused = auth_server.post("/query/add", json={"data": {"x": [1], "y": [2]}}, auth=user)
    assert refused.status_code == 403
    assert refused.json()["message"] == (
        "User 'evaluser' is not allowed to query deployed endpoints (/query)."
    )
    for path in ("/info", "/status", "/endpoints", "/endpoints/add"):
        assert auth_server.get(path, auth=user).status_code == 200
    delete = auth_server.request("DELETE", "/endpoints/add", auth=user)
    assert delete.status_code == 403


def test_query_only_user(auth_server: InProcessServer) -> None:
    user = ("queryuser", "q-pass")
    answer = auth_server.post("/query/add", json={"data": {"x": [1], "y": [2]}}, auth=user)
    assert answer.status_code == 200 and answer.json()["response"] == [3]
    refused = auth_server.post("/evaluate", json=EVALUATE_BODY, auth=user)
    assert refused.status_code == 403
    source = "the store" if auth_server.settings.users == "store" else "the password file"
    assert refused.json() == {
        "message": "User 'queryuser' is not allowed to run ad-hoc scripts (/evaluate).",
        "info": f"This needs the 'evaluate' permission; {source} grants this user: query.",
    }
    # Tableau's Test Connection runs no user code and is allowed to every user.
    tested = auth_server.post("/evaluate", json=CONNECTION_TEST_BODY, auth=user)
    assert tested.status_code == 200 and tested.json() == 1
    deploy = auth_server.post(
        "/endpoints", json={"name": "q", "type": "model", "archive": pickled(add)}, auth=user
    )
    assert deploy.status_code == 403


def test_manage_only_user_deploys_with_the_tabpy_client(auth_server: InProcessServer) -> None:
    client = Client(auth_server.url + "/")
    client.set_credentials("deployer", "d-pass")
    client.deploy("add_by_deployer", add, "deployed without evaluate", override=True)
    assert "add_by_deployer" in client.get_endpoints()
    refused = auth_server.post("/evaluate", json=EVALUATE_BODY, auth=("deployer", "d-pass"))
    assert refused.status_code == 403
    query = auth_server.post(
        "/query/add_by_deployer", json={"data": {"x": [1], "y": [1]}}, auth=("deployer", "d-pass")
    )
    assert query.status_code == 403
    client.remove("add_by_deployer")


def test_tabpy_client_set_credentials_deploys_and_queries(auth_server: InProcessServer) -> None:
    anonymous = Client(auth_server.url + "/")
    with pytest.raises(Exception):  # noqa: B017  # the client raises a bare exception on 401
        anonymous.get_endpoints()
    client = Client(auth_server.url + "/")
    client.set_credentials(*VALID)
    client.deploy("add_client", add, "Adds lists", override=True)
    assert client.query("add_client", [1, 2], [3, 4])["response"] == [4, 6]
    client.remove("add_client")


# --- auth off, evaluate off -------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(app_factory: AppFactory) -> InProcessServer:
    return app_factory(TABPY_EVALUATE_TIMEOUT="20")


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES, ids=ROUTE_IDS)
def test_credentials_without_auth_are_406(
    open_server: InProcessServer, method: str, path: str, body: object, ok: int
) -> None:
    answer = open_server.request(method, path, json=body, auth=VALID)
    assert answer.status_code == 406
    assert answer.json() == NOT_ACCEPTABLE
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="tabserve"'


def test_unparseable_header_without_auth_proceeds(open_server: InProcessServer) -> None:
    for header in ("Bearer abc", "Basic !!!", "nonsense"):
        headers = {"Authorization": header}
        answer = open_server.post("/evaluate", json=EVALUATE_BODY, headers=headers)
        assert answer.status_code == 200 and answer.json() == [5]


@pytest.fixture(scope="module")
def no_evaluate_server(app_factory: AppFactory, password_file: Path) -> InProcessServer:
    return app_factory(
        TABPY_PWD_FILE=str(password_file),
        TABPY_EVALUATE_ENABLE="false",
        TABSERVE_AUTH_MAX_DELAY="0",
        TABPY_MAX_REQUEST_SIZE_MB="1",
    )


def test_evaluate_disabled_still_needs_credentials(no_evaluate_server: InProcessServer) -> None:
    for credentials in (None, BAD_USER, BAD_PASSWORD):
        answer = no_evaluate_server.post("/evaluate", json=EVALUATE_BODY, auth=credentials)
        assert answer.status_code == 401
    answer = no_evaluate_server.post("/evaluate", json=EVALUATE_BODY, auth=VALID)
    assert answer.status_code == 404
    assert answer.json()["message"].startswith("Ad-hoc scripts have been disabled")


def test_authentication_comes_before_the_size_limit(no_evaluate_server: InProcessServer) -> None:
    oversized = b"x" * (2 * 1024 * 1024)
    refused = no_evaluate_server.post("/query/anything", data=oversized)
    assert refused.status_code == 401 and refused.json() == UNAUTHORIZED
    too_large = no_evaluate_server.post("/query/anything", data=oversized, auth=VALID)
    assert too_large.status_code == 413


# --- the password file changes while the server runs -----------------------------------------


def tabserve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tabserve", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for_status(server: Server, auth: tuple[str, str], status: int) -> None:
    deadline = time.monotonic() + 20
    while server.get("/status", auth=auth).status_code != status:
        assert time.monotonic() < deadline, f"{auth[0]} never got {status}"
        time.sleep(0.1)


def test_password_changes_apply_without_restart_and_sighup_reloads(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "passwords.txt"
    shutil.copy(FIXTURES / "tabpy_passwords.txt", path)
    server = server_factory(TABPY_PWD_FILE=str(path), TABSERVE_AUTH_MAX_DELAY="0")
    assert server.get("/status", auth=VALID).status_code == 200

    changed = tabserve_cli("user", "update", "-u", "user1", "-p", "N3w:pass", "-f", str(path))
    assert changed.returncode == 0, changed.stderr
    wait_for_status(server, VALID, 401)
    assert server.get("/status", auth=("user1", "N3w:pass")).status_code == 200

    added = tabserve_cli("user", "add", "-u", "newbie", "-p", "fresh", "-f", str(path))
    assert added.returncode == 0, added.stderr
    wait_for_status(server, ("newbie", "fresh"), 200)

    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.log().count("Password file reloaded") < 3:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert server.process.poll() is None
    assert server.get("/status", auth=("newbie", "fresh")).status_code == 200


def test_bad_password_file_stops_startup(tmp_path: Path) -> None:
    path = tmp_path / "passwords.txt"
    path.write_text("user1 not-a-hash\n")
    config = tmp_path / "tabpy.conf"
    config.write_text(f"[TabPy]\nTABPY_PWD_FILE = {path}\nTABPY_STATE_PATH = {tmp_path}/s\n")
    result = tabserve_cli("--config", str(config))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "line 1" in result.stderr


def test_user_add_refuses_a_malformed_file_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "passwords.txt"
    original = (FIXTURES / "tabpy_passwords.txt").read_text() + "broken line with four\n"
    path.write_text(original)
    result = tabserve_cli("user", "add", "-u", "someone", "-p", "pw", "-f", str(path))
    assert result.returncode != 0
    assert "line" in result.stderr
    assert path.read_text() == original


def test_request_bodies_in_log_are_not_json_dumped(auth_server: InProcessServer) -> None:
    # A 401 on /evaluate must not log or echo the script it refused.
    answer = auth_server.post("/evaluate", json={"script": "return 'TopSecretScript'", "data": {}})
    assert answer.status_code == 401
    assert "TopSecretScript" not in answer.text
    assert "TopSecretScript" not in auth_server.log()
    assert json.loads(answer.text) == UNAUTHORIZED


def test_operations_routes_with_auth_on(
    auth_server: InProcessServer, app_factory: AppFactory, password_file: Path
) -> None:
    """Health probes never need credentials; /metrics does, unless TABSERVE_METRICS_AUTH=false."""
    for path in ("/health/live", "/health/ready"):
        assert auth_server.get(path).status_code == 200
    refused = auth_server.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic realm=")
    allowed = auth_server.get("/metrics", auth=VALID)
    assert allowed.status_code == 200
    assert "tabserve_requests_total" in allowed.text
    open_metrics = app_factory(
        TABSERVE_WORKERS="1", TABPY_PWD_FILE=str(password_file), TABSERVE_METRICS_AUTH="false"
    )
    assert open_metrics.get("/metrics").status_code == 200
    assert open_metrics.get("/info").status_code == 401
