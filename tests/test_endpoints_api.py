"""Deployed endpoints over real HTTP, driven by the unmodified TabPy client."""

from __future__ import annotations

import base64
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import pytest
import requests
from tabpy.tabpy_tools.client import Client

from helpers import Server, ServerFactory

# The server's workers cannot import this test module, so functions deployed from it must be
# pickled by value, as they are when deployed from a notebook.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(x: list[float], y: list[float]) -> list[float]:
    """Add two lists element-wise."""
    return [a + b for a, b in zip(x, y, strict=True)]


def add_more(x: list[float], y: list[float]) -> list[float]:
    return [a + b + 100 for a, b in zip(x, y, strict=True)]


def fails(x: float) -> float:
    if x > 0:
        raise ValueError(f"x must not be positive, got {x}")
    return x


def nan_maker() -> list[float]:
    return [1.0, float("nan"), float("inf")]


def slow(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "done"


@pytest.fixture(scope="module")
def ep_server(server_factory: ServerFactory) -> Server:
    return server_factory(TABPY_EVALUATE_TIMEOUT="20")


@pytest.fixture(scope="module")
def client(ep_server: Server) -> Client:
    return Client(ep_server.url + "/")


def deploy_raw(server: Server, name: str, obj: object, **extra: object) -> requests.Response:
    body = {
        "name": name,
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(obj)).decode(),
        **extra,
    }
    return server.post("/endpoints", json=body)


def test_tabpy_client_flow(ep_server: Server, client: Client) -> None:
    client.deploy("add", add, "Adds lists", schema={"x": "list"}, is_public=True)
    assert client.query("add", [1, 2], [3, 4])["response"] == [4, 6]
    answer = client.query("add", x=[1], y=[2])
    assert answer["response"] == [3]
    assert (answer["version"], answer["model"]) == (1, "add")
    assert len(answer["uuid"]) == 36

    endpoints = client.get_endpoints()
    assert endpoints["add"].version == 1
    assert endpoints["add"].description == "Adds lists"

    with pytest.raises(RuntimeError, match="already exists"):
        client.deploy("add", add_more, "Adds more")
    client.deploy("add", add_more, "Adds more", override=True)
    answer = client.query("add", [1, 2], [3, 4])
    assert (answer["response"], answer["version"]) == ([104, 106], 2)
    assert ep_server.get("/status").json()["add"] == {
        "version": 2, "type": "model", "status": "LoadSuccessful", "last_error": None,
    }  # fmt: skip

    client.update_endpoint_info("add", description="Adds a hundred more")
    info = ep_server.get("/endpoints/add").json()
    assert info["description"] == "Adds a hundred more"
    assert info["version"] == 2
    assert info["is_public"] is False  # the override deploy sent is_public=False
    assert info["schema"] == "{'x': 'list'}"  # TabPy's client sends schemas as repr strings

    client.remove("add")
    assert "add" not in client.get_endpoints()
    response = ep_server.post("/query/add", json={"data": [[1], [2]]})
    assert response.status_code == 404
    assert response.json() == {"message": "UnknownURI", "info": "Endpoint 'add' does not exist"}


def test_endpoint_routes_answer_in_tabpy_shapes(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "shape", add, description="d").status_code == 201
    listed = ep_server.get("/endpoints").json()
    assert listed["shape"]["type"] == "model"
    assert ep_server.get("/endpoints/").json() == listed
    bare = ep_server.get("/endpoints/shape").json()
    assert bare == listed["shape"]
    assert list(bare)[:10] == [
        "description", "type", "version", "dependencies", "target", "creation_time",
        "last_modified_time", "schema", "is_public", "docstring",
    ]  # fmt: skip
    missing = ep_server.get("/endpoints/nope")
    assert missing.status_code == 404
    assert missing.json() == {"message": "Unknown endpoint", "info": "Endpoint nope is not found"}
    destination = ep_server.get("/configurations/endpoint_upload_destination").json()
    assert destination == {"path": str(ep_server.state_path / "staging")}
    assert requests.delete(ep_server.url + "/endpoints/shape", timeout=10).status_code == 204


def test_metadata_only_put_keeps_fields_it_does_not_send(ep_server: Server) -> None:
    created = deploy_raw(ep_server, "meta", add, schema={"in": "x"}, is_public=True)
    assert created.status_code == 201
    response = requests.put(
        ep_server.url + "/endpoints/meta", json={"description": "only this"}, timeout=10
    )
    assert response.status_code == 200
    info = response.json()["meta"]
    assert (info["description"], info["schema"], info["is_public"]) == (
        "only this", {"in": "x"}, True,
    )  # fmt: skip
    assert info["version"] == 1
    missing = requests.put(ep_server.url + "/endpoints/nope", json={"a": 1}, timeout=10)
    assert missing.status_code == 404


def test_query_errors_name_the_real_cause(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "fails", fails).status_code == 201
    response = ep_server.post("/query/fails", json={"data": {"x": 3}})
    assert response.status_code == 500
    body = response.json()
    assert body["message"] == "Error querying function 'fails'"
    assert body["info"]["type"] == "QueryFailed"
    assert body["info"]["error"].startswith("ValueError: x must not be positive, got 3 (line ")
    assert "Traceback" not in response.text

    wrong = ep_server.post("/query/fails", json={"data": {"y": 3}})
    assert wrong.status_code == 500
    assert "TypeError" in wrong.json()["info"]["error"]

    for body_bytes, message in [
        (b"{", "Request body is not valid JSON"),
        (b"[1]", 'Input data must be a JSON object with a key called "data"'),
        (b'{"data": 5}', "Query parameter needs to be a dictionary or a list"),
    ]:
        bad = ep_server.post("/query/fails", data=body_bytes)
        assert bad.status_code == 400
        assert bad.json()["message"].startswith(message)


def test_query_turns_nan_into_null_and_accepts_get(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "nans", nan_maker).status_code == 201
    response = requests.get(ep_server.url + "/query/nans", data=b'{"data": []}', timeout=10)
    assert response.status_code == 200
    assert response.json()["response"] == [1.0, None, None]
    assert "NaN" not in response.text


def test_aliases_resolve_show_in_status_and_protect_their_target(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "target_fn", add).status_code == 201
    alias = ep_server.post(
        "/endpoints", json={"name": "sum2", "type": "alias", "target": "target_fn"}
    )
    assert alias.status_code == 201
    answer = ep_server.post("/query/sum2", json={"data": [[1], [2]]}).json()
    assert (answer["response"], answer["model"]) == ([3], "target_fn")
    assert ep_server.get("/status").json()["sum2"]["type"] == "alias"
    refused = requests.delete(ep_server.url + "/endpoints/target_fn", timeout=10)
    assert refused.status_code == 400
    assert "sum2" in refused.json()["message"]


def test_tabpy_query_inside_evaluate(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "adder", add).status_code == 201
    assert deploy_raw(ep_server, "fails2", fails).status_code == 201
    ok = ep_server.evaluate(
        "return tabpy.query('adder', _arg1, _arg2)['response']", _arg1=[1, 2], _arg2=[3, 4]
    )
    assert ok.json() == [4, 6]
    envelope = ep_server.evaluate("return tabpy.query('adder', x=[1], y=[1])").json()
    assert set(envelope) == {"response", "version", "model", "uuid"}

    missing = ep_server.evaluate("return tabpy.query('nope', 1)['response']")
    assert missing.status_code == 500
    assert "endpoint 'nope' is not deployed" in missing.json()["info"]

    raised = ep_server.evaluate("return tabpy.query('fails2', 5)['response']")
    assert raised.status_code == 500
    info = raised.json()["info"]
    assert "endpoint 'fails2' raised ValueError: x must not be positive, got 5 (line " in info


def test_tabpy_query_name_is_percent_decoded_once_as_a_query_url_would_be(
    ep_server: Server,
) -> None:
    # Workbooks written for TabPy say tabpy.query('Sentiment%20Analysis', ...): TabPy puts the
    # name into a /query/<name> URL, so it arrives decoded. TabPy's own integration suite
    # (test_deploy_and_evaluate_model_ssl) does this.
    assert deploy_raw(ep_server, "A B", add).status_code == 201
    for name in ("A%20B", "A B", "%41%20%42"):
        ok = ep_server.evaluate(
            f"return tabpy.query('{name}', _arg1, _arg2)['response']", _arg1=[1], _arg2=[2]
        )
        assert ok.status_code == 200, ok.text
        assert ok.json() == [3]
    # Decoded once only, like tabserve's /query/<name> route: %2520 means a literal "%20".
    twice = ep_server.evaluate("return tabpy.query('A%2520B', _arg1)['response']", _arg1=[1])
    assert twice.status_code == 500
    assert "endpoint 'A%20B' is not deployed" in twice.json()["info"]
    # The same name over HTTP reaches the same endpoint.
    over_http = requests.post(ep_server.url + "/query/A%20B", json={"data": [[1], [2]]}, timeout=10)
    assert over_http.json()["response"] == [3]


def test_unknown_type_and_bad_bodies_are_400(ep_server: Server) -> None:
    for body, message in [
        (b"", "Input body cannot be empty"),
        (b"{", "Failed to decode input body"),
        (b"[]", "Input body must be a JSON object"),
        (b'{"name": "b", "type": "banana", "src_path": "x"}', "endpoint type must be one of"),
        (b"[" * 100_000 + b"]" * 100_000, "Failed to decode input body"),
        (
            b'{"name": "b", "type": "model", "archive": "", "python_version": 3.11}',
            "python_version must be a string",
        ),
    ]:
        response = ep_server.post("/endpoints", data=body)
        assert response.status_code == 400
        assert response.json()["message"].startswith(message)


def test_pickle_from_another_python_is_refused(ep_server: Server) -> None:
    response = deploy_raw(ep_server, "old", add, python_version="3.6.9")
    assert response.status_code == 400
    message = response.json()["message"]
    assert "3.6.9" in message and f"{sys.version_info.major}.{sys.version_info.minor}" in message
    assert "old" not in ep_server.get("/endpoints").json()


def test_archive_that_does_not_load_is_refused(ep_server: Server) -> None:
    body = {"name": "broken", "type": "model", "archive": base64.b64encode(b"junk").decode()}
    response = ep_server.post("/endpoints", json=body)
    assert response.status_code == 400
    assert response.json()["message"] == "could not load endpoint 'broken'"
    assert "UnpicklingError" in response.json()["info"]
    assert "broken" not in ep_server.get("/endpoints").json()


def test_info_stays_fast_during_a_slow_query(ep_server: Server) -> None:
    assert deploy_raw(ep_server, "slow", slow).status_code == 201
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(ep_server.post, "/query/slow", json={"data": [3]})
        time.sleep(0.5)
        latencies = []
        for _ in range(5):
            started = time.perf_counter()
            assert ep_server.get("/info").status_code == 200
            latencies.append(time.perf_counter() - started)
        assert pending.result().json()["response"] == "done"
    assert max(latencies) < 0.1, latencies


def test_endpoints_survive_a_restart(server_factory: ServerFactory, tmp_path: Path) -> None:
    first = server_factory(TABSERVE_WORKERS="1")
    docstring = "Line one – naïve 100%\n    indented\nlast"
    assert deploy_raw(first, "keep", add, docstring=docstring).status_code == 201
    first.stop()
    second = server_factory(TABSERVE_WORKERS="1", TABPY_STATE_PATH=str(first.state_path))
    assert second.get("/endpoints/keep").json()["docstring"] == docstring
    deadline = time.monotonic() + 30
    while second.get("/status").json()["keep"]["status"] == "LoadInProgress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert second.get("/status").json()["keep"]["status"] == "LoadSuccessful"
    assert second.post("/query/keep", json={"data": [[1], [1]]}).json()["response"] == [2]


def test_load_failure_shows_in_status_and_spares_other_endpoints(
    server_factory: ServerFactory,
) -> None:
    first = server_factory(TABSERVE_WORKERS="1")
    assert deploy_raw(first, "good", add).status_code == 201
    assert deploy_raw(first, "bad", add).status_code == 201
    first.stop()
    (first.state_path / "query_objects" / "bad" / "1" / "pickle_archive").write_bytes(b"junk")
    second = server_factory(TABSERVE_WORKERS="1", TABPY_STATE_PATH=str(first.state_path))
    deadline = time.monotonic() + 30
    while "LoadInProgress" in {s["status"] for s in second.get("/status").json().values()}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status = second.get("/status").json()
    assert status["bad"]["status"] == "LoadFailed"
    assert status["bad"]["last_error"].startswith("Load failed: ")
    assert status["good"]["status"] == "LoadSuccessful"
    failed = second.post("/query/bad", json={"data": [[1], [1]]})
    assert failed.status_code == 500 and failed.json()["info"]["type"] == "LoadFailed"
    assert second.post("/query/good", json={"data": [[1], [1]]}).json()["response"] == [2]
