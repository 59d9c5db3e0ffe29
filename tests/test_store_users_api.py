"""Users and permissions from the store (TABSERVE_USERS = store), on a real server, for both
backends: the state directory (tabserve.db) and PostgreSQL."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import cloudpickle
import pytest
from pg import PostgresServer

from helpers import Server, ServerFactory
from tabserve.cli import main

ADMIN = ("admin", "admin-pass-1")
READER = ("reader", "reader-pass-1")


# One server per backend for the module, not per test: each test uses names of its own
# (users, endpoints) and needs nothing another test added or removed.
@pytest.fixture(scope="module", params=["statedir", "postgresql"])
def store_server(
    request: pytest.FixtureRequest,
    server_factory: ServerFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp(f"users-{request.param}")
    if request.param == "statedir":
        location = str(tmp_path / "state")
        config = {"TABPY_STATE_PATH": location}
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        location = pg.fresh_database("store_users_api")
        config = {"TABSERVE_STORE": location}
    for name, password, permissions in (ADMIN + ("all",), READER + ("query",)):
        assert main(["user", "add", "-u", name, "-p", password, "--permissions", permissions,
                     "--store", location]) == 0  # fmt: skip
    server = server_factory(workdir=tmp_path, auth=ADMIN, TABSERVE_USERS="store", **config)
    server.location = location  # type: ignore[attr-defined]
    yield server
    server.stop()


def _deploy_body(name: str) -> dict[str, object]:
    def triple(x: list[int]) -> list[int]:
        return [3 * v for v in x]

    return {
        "name": name,
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(triple)).decode("ascii"),
    }


def test_store_users_authenticate_and_their_permissions_hold(store_server: Server) -> None:
    server = store_server
    assert server.get("/endpoints", auth=None).status_code == 401
    assert server.get("/endpoints", auth=("admin", "wrong")).status_code == 401
    refused = server.post("/endpoints", json=_deploy_body("triple"), auth=READER)
    assert refused.status_code == 403, refused.text
    assert server.post("/endpoints", json=_deploy_body("triple")).status_code == 201
    query = server.post("/query/triple", json={"data": {"x": [1, 2]}}, auth=READER)
    assert query.status_code == 200 and query.json()["response"] == [3, 6]
    assert server.post("/evaluate", json={"script": "return 1"}, auth=READER).status_code == 403


def test_user_changes_reach_a_running_server(store_server: Server, capsys) -> None:  # type: ignore[no-untyped-def]
    server = store_server
    location = server.location  # type: ignore[attr-defined]
    assert main(["user", "add", "-u", "late", "-p", "late-pass", "--store", location]) == 0
    _eventually(lambda: server.get("/endpoints", auth=("late", "late-pass")).status_code == 200)
    assert main(["user", "update", "-u", "late", "-p", "new-pass", "--store", location]) == 0
    _eventually(lambda: server.get("/endpoints", auth=("late", "late-pass")).status_code == 401)
    assert server.get("/endpoints", auth=("late", "new-pass")).status_code == 200
    assert main(["user", "delete", "-u", "late", "--store", location]) == 0
    _eventually(lambda: server.get("/endpoints", auth=("late", "new-pass")).status_code == 401)


def test_deleting_a_user_revokes_their_api_keys(store_server: Server) -> None:
    """A key names its user by name: a new user given the name must not inherit it."""
    server = store_server
    temp = {"name": "temp", "password": "temp-pass-1", "permissions": ["query"]}
    assert server.post("/users", json=temp).status_code == 201
    created = server.post("/keys", json={"user": "temp"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    with_key = {"Authorization": f"Key {key['secret']}"}
    assert server.get("/endpoints", auth=None, headers=with_key).status_code == 200
    assert server.request("DELETE", "/users/temp").status_code == 204
    assert server.post("/users", json=temp).status_code == 201  # the same name, again
    time.sleep(1.0)  # past the second within which every replica re-reads a key
    assert server.get("/endpoints", auth=None, headers=with_key).status_code == 401
    assert server.get(f"/keys/{key['id']}").json()["key"]["revoked"] is not None
    assert server.get("/endpoints", auth=("temp", "temp-pass-1")).status_code == 200


def _eventually(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)
