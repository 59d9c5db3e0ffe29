"""tabserve.Client: unit tests against a stub HTTP server, then end to end against tabserve.

The stub (stdlib ``http.server`` on 127.0.0.1, in a thread) records each request and answers
from a table, so the unit tests can check exactly what goes on the wire and how every kind
of answer is mapped. The end-to-end tests start a real tabserve with ``server_factory``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import tabserve
from helpers import Server, ServerFactory
from tabserve import (
    BadRequest,
    Client,
    Endpoint,
    EndpointExists,
    NotFound,
    Overloaded,
    ScriptError,
    TabserveError,
    Unauthorized,
)

# The server's workers cannot import this test module: functions deployed from it must travel
# by value, as they do when deployed from a notebook.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent


def add(x: list[float], y: list[float]) -> list[float]:
    """Add two lists element-wise."""
    return [a + b for a, b in zip(x, y, strict=True)]


def add_more(x: list[float], y: list[float]) -> list[float]:
    return [a + b + 100 for a, b in zip(x, y, strict=True)]


def greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


def fails(x: float) -> float:
    raise ValueError(f"x must not be {x}")


# -- the stub server ------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Stub:
    """Answers ``(method, path)`` from ``routes``; anything else is a JSON 404."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.routes: dict[tuple[str, str], tuple[int, bytes, str]] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def answer(
        self, method: str, path: str, status: int = 200, body: Any = None, *, raw: bytes = b""
    ) -> None:
        if body is not None:
            self.routes[(method, path)] = (status, json.dumps(body).encode(), "application/json")
        else:
            self.routes[(method, path)] = (status, raw, "text/html")

    def only(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a stuck test client cannot hold a handler thread for ever

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append(Recorded(self.command, self.path, headers, body))
                missing = json.dumps({"message": "no stub route", "info": self.path}).encode()
                status, payload, kind = stub.routes.get(
                    (self.command, self.path), (404, missing, "application/json")
                )
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


@pytest.fixture
def stub_client(stub: Stub) -> Iterator[Client]:
    with Client(stub.url, query_timeout=5) as client:
        yield client


INFO = {
    "description": "Adds",
    "type": "model",
    "version": 1,
    "dependencies": [],
    "target": None,
    "creation_time": 1700000000,
    "last_modified_time": 1700000100,
    "schema": {"input": "x"},
    "is_public": True,
    "docstring": "Add two lists element-wise.",
    "python_version": "3.11.7",
    "cloudpickle_version": "3.1.2",
    "signature": "(x, y)",
}


# -- URL handling and construction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://h:9004", "http://h:9004/"),  # TabPy built http://h:9004info from this
        ("http://h:9004/", "http://h:9004/"),
        ("https://tabserve.example.com", "https://tabserve.example.com/"),
        ("http://h:9004/tabpy", "http://h:9004/tabpy/"),  # behind a proxy, with a prefix
        ("http://h:9004/tabpy//", "http://h:9004/tabpy/"),
        ("  http://[::1]:9004 ", "http://[::1]:9004/"),
    ],
)
def test_endpoint_url_is_normalised(given: str, base: str) -> None:
    assert Client(given).endpoint == base


@pytest.mark.parametrize(
    "bad", ["", "h:9004", "localhost", "ftp://h/", "http:/h", "http://h:99999", "http://h/?a=1"]
)
def test_bad_endpoint_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        Client(bad)


def test_non_string_endpoint_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Client(9004)  # type: ignore[arg-type]


def test_every_url_is_built_on_the_base_without_a_trailing_slash(
    stub: Stub, stub_client: Client
) -> None:
    stub.answer("GET", "/status", body={})
    assert stub_client.get_status() == {}
    assert [r.path for r in stub.requests] == ["/status"]


def test_query_timeout_is_seconds_and_must_be_positive() -> None:
    client = Client("http://h:9004")
    assert client.query_timeout == 1000.0
    client.query_timeout = 2.5
    assert client.query_timeout == 2.5
    for bad in (0, -1, "10", None, True):
        with pytest.raises(ValueError, match="query_timeout"):
            client.query_timeout = bad  # type: ignore[assignment]
        with pytest.raises(ValueError, match="query_timeout"):
            Client("http://h:9004", query_timeout=bad)  # type: ignore[arg-type]


def test_tabpy_only_arguments_are_accepted_and_ignored() -> None:
    client = Client("http://h:9004/", 30, remote_server=True, localhost_endpoint="http://x/")
    assert client.endpoint == "http://h:9004/"
    assert client.query_timeout == 30.0


# -- deploy: what goes on the wire -----------------------------------------------------------


def test_deploy_posts_the_pickle_and_its_fingerprint(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/endpoints", body={})
    stub.answer("POST", "/endpoints", 201, body={"add": INFO})

    endpoint = stub_client.deploy("add", add, "Adds", schema={"input": "x"}, is_public=True)

    assert [(r.method, r.path) for r in stub.requests] == [
        ("GET", "/endpoints"),
        ("POST", "/endpoints"),
    ]
    post = stub.only("POST")[0]
    assert post.headers["content-type"] == "application/json"
    body = post.json()
    archive = body.pop("archive")
    assert body == {
        "name": "add",
        "type": "model",
        "description": "Adds",
        "docstring": "Add two lists element-wise.",
        "schema": {"input": "x"},  # JSON, not TabPy's str(dict)
        "is_public": True,
        "dependencies": [],
        "methods": [{"method": "query"}],
        "archive_format": "cloudpickle",
        "python_version": platform.python_version(),
        "cloudpickle_version": cloudpickle.__version__,
        "signature": "(x: 'list[float]', y: 'list[float]') -> 'list[float]'",
    }
    # The bare function, pickled as is: it runs once unpickled.
    assert cloudpickle.loads(base64.b64decode(archive))([1], [2]) == [3]
    assert endpoint == Endpoint.from_info("add", INFO)


def test_deploy_of_a_taken_name_raises_like_tabpy_and_sends_nothing(
    stub: Stub, stub_client: Client
) -> None:
    stub.answer("GET", "/endpoints", body={"add": INFO})
    with pytest.raises(EndpointExists) as caught:
        stub_client.deploy("add", add)
    assert str(caught.value) == (
        "An endpoint with that name (add) already exists. "
        'Use "override = True" to force update an existing endpoint.'
    )
    # Notebooks written for TabPy catch RuntimeError here.
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value, BadRequest)
    assert [r.method for r in stub.requests] == ["GET"]


def test_deploy_with_override_puts_a_new_version(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/endpoints", body={"my add": INFO})
    stub.answer("PUT", "/endpoints/my%20add", body={"my add": {**INFO, "version": 2}})

    endpoint = stub_client.deploy("my add", add_more, override=True)

    put = stub.only("PUT")[0].json()
    assert put["should_update_version"] is True
    assert put["docstring"] == ""  # add_more has none
    assert cloudpickle.loads(base64.b64decode(put["archive"]))([1], [2]) == [103]
    assert endpoint.version == 2


def test_override_of_a_new_name_is_a_post(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/endpoints", body={})
    stub.answer("POST", "/endpoints", 201, body={"add": INFO})
    stub_client.deploy("add", add, override=True)
    assert "should_update_version" not in stub.only("POST")[0].json()


class Scaler:
    """An object with a query method, as TabPy's QueryObject subclasses have."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def query(self, x: list[int]) -> list[int]:
        return [self.factor * v for v in x]


def test_an_object_with_a_query_method_can_be_deployed(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/endpoints", body={})
    stub.answer("POST", "/endpoints", 201, body={"scale": INFO})
    stub_client.deploy("scale", Scaler(3))
    body = stub.only("POST")[0].json()
    assert body["signature"] == "(x: 'list[int]') -> 'list[int]'"
    assert body["docstring"].startswith("An object with a query method")
    assert cloudpickle.loads(base64.b64decode(body["archive"])).query([1]) == [3]


def test_deploy_refuses_what_cannot_be_called(stub: Stub, stub_client: Client) -> None:
    with pytest.raises(TypeError, match="not callable"):
        stub_client.deploy("x", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        stub_client.deploy(None, add)  # type: ignore[arg-type]
    assert stub.requests == []


def test_update_endpoint_info_sends_only_what_changes(stub: Stub, stub_client: Client) -> None:
    stub.answer("PUT", "/endpoints/add", body={"add": {**INFO, "description": "new"}})
    endpoint = stub_client.update_endpoint_info("add", description="new")
    assert stub.only("PUT")[0].json() == {"description": "new", "should_update_version": False}
    assert endpoint.description == "new"
    with pytest.raises(TypeError):
        stub_client.update_endpoint_info("add", is_public="yes")  # type: ignore[arg-type]


def test_alias_posts_an_alias_endpoint(stub: Stub, stub_client: Client) -> None:
    alias = {**INFO, "type": "alias", "target": "add", "dependencies": ["add"]}
    stub.answer("GET", "/endpoints", body={"add": INFO})
    stub.answer("POST", "/endpoints", 201, body={"sum2": alias})
    endpoint = stub_client.alias("sum2", "add")
    assert stub.only("POST")[0].json() == {
        "name": "sum2",
        "type": "alias",
        "target": "add",
        "description": "",
    }
    assert (endpoint.type, endpoint.target) == ("alias", "add")


def test_remove_deletes(stub: Stub, stub_client: Client) -> None:
    stub.answer("DELETE", "/endpoints/add", 204)
    stub_client.remove("add")
    assert stub.only("DELETE")[0].body == b""


# -- reading ---------------------------------------------------------------------------------


def test_get_endpoints_gives_dataclasses_with_utc_times(stub: Stub, stub_client: Client) -> None:
    alias = {"type": "alias", "version": 1, "target": "add", "dependencies": ["add"]}
    future = {**INFO, "gpu": "none"}  # a field this client does not know yet
    stub.answer("GET", "/endpoints", body={"add": future, "sum2": alias})

    endpoints = stub_client.get_endpoints()

    add_ep = endpoints["add"]
    assert add_ep.creation_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert add_ep.last_modified_time is not None
    assert (add_ep.signature, add_ep.python_version, add_ep.schema) == (
        "(x, y)",
        "3.11.7",
        {"input": "x"},
    )
    assert add_ep.extra == {"gpu": "none"}
    assert endpoints["sum2"].python_version is None  # not deployed by this client
    assert list(stub_client.get_endpoints("alias")) == ["sum2"]
    assert list(stub_client.get_endpoints(type="model")) == ["add"]


def test_tabpy_state_strings_for_is_public_are_read_as_bools() -> None:
    assert Endpoint.from_info("a", {"is_public": "False"}).is_public is False
    assert Endpoint.from_info("a", {"is_public": "True"}).is_public is True


# -- query and evaluate ----------------------------------------------------------------------


def test_query_sends_positional_or_keyword_data(stub: Stub, stub_client: Client) -> None:
    answer = {"response": [4, 6], "version": 1, "model": "add", "uuid": "u"}
    stub.answer("POST", "/query/add", body=answer)
    assert stub_client.query("add", [1, 2], [3, 4]) == answer
    stub_client.query("add", x=[1], y=[2])
    stub_client.query("add")
    bodies = [r.json() for r in stub.requests]
    assert bodies == [{"data": [[1, 2], [3, 4]]}, {"data": {"x": [1], "y": [2]}}, {"data": []}]
    with pytest.raises(ValueError, match="Mixing"):
        stub_client.query("add", [1], y=[2])


def test_nan_becomes_null_and_arrays_become_lists(stub: Stub, stub_client: Client) -> None:
    np = pytest.importorskip("numpy")
    stub.answer("POST", "/query/add", body={"response": None})
    stub_client.query("add", [1.0, math.nan], np.array([1.5, np.inf]), (np.int64(3),))
    assert stub.requests[0].json() == {"data": [[1.0, None], [1.5, None], [3]]}


def test_evaluate_numbers_positional_arguments(stub: Stub, stub_client: Client) -> None:
    stub.answer("POST", "/evaluate", body=[5, 7])
    assert stub_client.evaluate("return _arg1", [5, 7], "b", _arg3=3) == [5, 7]
    assert stub.requests[0].json() == {
        "script": "return _arg1",
        "data": {"_arg1": [5, 7], "_arg2": "b", "_arg3": 3},
    }
    with pytest.raises(ValueError, match="_arg1"):
        stub_client.evaluate("return _arg1", 1, _arg1=2)
    stub_client.evaluate("return 1")
    assert stub.requests[-1].json() == {"script": "return 1", "data": {}}  # data always sent


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequest), (401, Unauthorized), (404, NotFound), (500, ScriptError),
     (503, Overloaded)],
)  # fmt: skip
def test_error_envelopes_become_typed_errors(
    stub: Stub, stub_client: Client, status: int, cls: type[TabserveError]
) -> None:
    stub.answer("GET", "/endpoints/x", status, body={"message": "it broke", "info": {"a": 1}})
    with pytest.raises(cls) as caught:
        stub_client.get_endpoint("x")
    assert (caught.value.status, caught.value.message, caught.value.info) == (
        status,
        "it broke",
        {"a": 1},
    )


def test_unknown_status_and_non_json_body_still_raise_with_both(
    stub: Stub, stub_client: Client
) -> None:
    stub.answer("GET", "/info", 502, raw=b"<html>Bad Gateway from the proxy</html>")
    with pytest.raises(TabserveError) as caught:
        stub_client.get_info()
    assert caught.value.status == 502
    assert "Bad Gateway from the proxy" in caught.value.message

    stub.answer("GET", "/status", 418, body={"message": "teapot", "info": ""})
    with pytest.raises(TabserveError) as teapot:
        stub_client.get_status()
    assert (teapot.value.status, teapot.value.message) == (418, "teapot")


def test_huge_non_json_error_bodies_are_cut(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/info", 500, raw=b"x" * 100_000)
    with pytest.raises(TabserveError) as caught:
        stub_client.get_info()
    assert len(caught.value.message) < 2100


def test_a_success_that_is_not_json_is_an_error(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/info", 200, raw=b"<html>a captive portal</html>")
    with pytest.raises(TabserveError, match="not JSON"):
        stub_client.get_info()


# -- credentials and lifetime ----------------------------------------------------------------


def test_set_credentials_sends_basic_auth(stub: Stub, stub_client: Client) -> None:
    stub.answer("GET", "/info", body={})
    stub_client.get_info()
    stub_client.set_credentials("alice", "s3cret:x")
    stub_client.get_info()
    first, second = stub.requests
    assert "authorization" not in first.headers
    expected = base64.b64encode(b"alice:s3cret:x").decode()
    assert second.headers["authorization"] == f"Basic {expected}"


def test_a_closed_client_refuses_requests(stub: Stub) -> None:
    with Client(stub.url, query_timeout=5) as client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        client.get_info()
    assert stub.requests == []


def test_connection_errors_are_oserrors() -> None:
    from helpers import free_port

    client = Client(f"http://127.0.0.1:{free_port()}", query_timeout=5)
    with pytest.raises(OSError):  # requests.ConnectionError is an OSError
        client.get_info()


# -- import graph ----------------------------------------------------------------------------


def test_importing_the_client_loads_no_server_code() -> None:
    """``import tabserve`` loads no HTTP library; ``Client`` loads no server module."""
    code = textwrap.dedent(
        """
        import sys
        import tabserve
        lazy = ("requests", "cloudpickle", "tabserve.client")
        light = sorted(m for m in lazy if m in sys.modules)
        from tabserve import Client, NotFound
        Client("http://127.0.0.1:9004")
        heavy = ("tornado", "numpy", "pandas", "orjson", "tabserve.server", "tabserve.worker",
                 "tabserve.store", "tabserve.config")
        print(light, sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[] []"


def test_package_exports() -> None:
    assert tabserve.__all__ == sorted(tabserve.__all__)
    for name in tabserve.__all__:
        assert getattr(tabserve, name) is not None
    with pytest.raises(AttributeError):
        tabserve.NoSuchThing  # noqa: B018


# -- end to end, against a real tabserve ----------------------------------------------------


@pytest.fixture(scope="module")
def live(server_factory: ServerFactory) -> Iterator[Server]:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="20")
    yield server
    server.stop()  # now, not at the end of the session: its workers hold memory


@pytest.fixture
def client(live: Server) -> Iterator[Client]:
    with Client(live.url, query_timeout=60) as client:  # no trailing slash on purpose
        yield client


def test_deploy_query_and_describe(client: Client) -> None:
    deployed = client.deploy("e2e add", add, "Adds lists", schema={"x": "list"}, is_public=True)
    assert (deployed.name, deployed.version, deployed.type) == ("e2e add", 1, "model")

    assert client.query("e2e add", [1, 2], [3, 4])["response"] == [4, 6]
    answer = client.query("e2e add", x=[1], y=[2])
    assert (answer["response"], answer["version"], answer["model"]) == ([3], 1, "e2e add")

    endpoint = client.get_endpoints()["e2e add"]
    assert isinstance(endpoint, Endpoint)
    assert endpoint.description == "Adds lists"
    assert endpoint.docstring == "Add two lists element-wise."
    assert endpoint.schema == {"x": "list"}
    assert endpoint.is_public is True
    assert endpoint.python_version == platform.python_version()
    assert endpoint.cloudpickle_version == cloudpickle.__version__
    assert endpoint.signature == "(x: 'list[float]', y: 'list[float]') -> 'list[float]'"
    assert isinstance(endpoint.creation_time, datetime)
    assert endpoint.creation_time.tzinfo is timezone.utc
    assert client.get_endpoint("e2e add") == endpoint
    assert client.get_status()["e2e add"]["status"] == "LoadSuccessful"


def test_keyword_arguments_and_defaults_reach_the_function(client: Client) -> None:
    client.deploy("e2e greet", greet)
    assert client.query("e2e greet", "ann")["response"] == "hello ann!"
    assert client.query("e2e greet", name="bo", punctuation="?")["response"] == "hello bo?"


def test_an_object_with_a_query_method_serves_through_it(client: Client) -> None:
    client.deploy("e2e scaler", Scaler(3))
    assert client.query("e2e scaler", [1, 2])["response"] == [3, 6]


def test_override_serves_the_new_code_as_version_2(client: Client) -> None:
    client.deploy("e2e versions", add)
    with pytest.raises(EndpointExists):
        client.deploy("e2e versions", add_more)
    assert client.query("e2e versions", [1], [1])["response"] == [2]  # unchanged

    replaced = client.deploy("e2e versions", add_more, override=True)
    assert replaced.version == 2
    answer = client.query("e2e versions", [1], [1])
    assert (answer["response"], answer["version"]) == ([102], 2)
    assert client.get_status()["e2e versions"]["version"] == 2


def test_update_endpoint_info_keeps_code_version_and_schema(client: Client) -> None:
    client.deploy("e2e meta", add, "first", schema={"in": ["x", "y"]})
    updated = client.update_endpoint_info("e2e meta", description="second")
    assert (updated.description, updated.version) == ("second", 1)
    assert updated.schema == {"in": ["x", "y"]}
    again = client.update_endpoint_info("e2e meta", is_public=True)
    assert (again.description, again.is_public) == ("second", True)
    assert again.schema == {"in": ["x", "y"]}
    assert client.query("e2e meta", [1], [2])["response"] == [3]


def test_remove_then_query_is_not_found(client: Client) -> None:
    client.deploy("e2e gone", add)
    client.remove("e2e gone")
    assert "e2e gone" not in client.get_endpoints()
    with pytest.raises(NotFound) as caught:
        client.query("e2e gone", [1], [2])
    assert caught.value.status == 404
    assert "e2e gone" in str(caught.value)
    with pytest.raises(NotFound):
        client.remove("e2e gone")


def test_alias_answers_for_its_target(client: Client) -> None:
    client.deploy("e2e target", add)
    alias = client.alias("e2e alias", "e2e target", "another name")
    assert (alias.type, alias.target, alias.description) == ("alias", "e2e target", "another name")
    answer = client.query("e2e alias", [1], [2])
    assert (answer["response"], answer["model"]) == ([3], "e2e target")
    assert list(client.get_endpoints(type="alias")) == ["e2e alias"]
    with pytest.raises(EndpointExists):
        client.alias("e2e alias", "e2e target")
    with pytest.raises(BadRequest, match="depends on it"):  # the server protects the target
        client.remove("e2e target")


def test_evaluate_and_its_errors(client: Client) -> None:
    assert client.evaluate("return [a * 2 for a in _arg1]", [1, 2]) == [2, 4]
    assert client.evaluate("return _arg1 + _arg2", 1, 2) == 3
    with pytest.raises(ScriptError) as caught:
        client.evaluate("return 1 / 0")
    assert caught.value.status == 500
    assert caught.value.message == "Error processing script"
    assert "ZeroDivisionError" in str(caught.value.info)


def test_a_failing_endpoint_raises_with_the_servers_reason(client: Client) -> None:
    client.deploy("e2e fails", fails)
    with pytest.raises(ScriptError) as caught:
        client.query("e2e fails", 3)
    assert caught.value.status == 500
    assert "x must not be 3" in str(caught.value)


def test_a_pickle_from_another_python_is_refused_naming_both_versions(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = f"3.{sys.version_info.minor - 1}.4"  # a minor version that is not this one
    monkeypatch.setattr(platform, "python_version", lambda: other)
    with pytest.raises(BadRequest) as caught:
        client.deploy("e2e old python", add)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert caught.value.status == 400
    assert other in caught.value.message
    assert f"Python {here}" in caught.value.message
    assert "e2e old python" not in client.get_endpoints()


def test_a_function_the_server_cannot_import_fails_the_deploy(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Functions from an importable module travel by reference; the server says it lacks it."""
    (tmp_path / "only_on_the_client.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from only_on_the_client import double  # type: ignore[import-not-found]

    with pytest.raises(BadRequest) as caught:
        client.deploy("e2e by reference", double)
    assert "only_on_the_client" in str(caught.value)
    assert "e2e by reference" not in client.get_endpoints()
    sys.modules.pop("only_on_the_client", None)


def test_info_and_status(client: Client) -> None:
    info = client.get_info()
    assert info["server_version"] == tabserve.__version__
    assert "v1" in info["versions"]
    for status in client.get_status().values():
        assert set(status) >= {"version", "type", "status"}


# -- no shared filesystem ----------------------------------------------------------------------

# Run in a separate interpreter, as a notebook would be: the function is defined in __main__,
# so cloudpickle sends it by value. An audit hook (PEP 578) records every filesystem change
# the process makes, and each file opened for writing.
_CLIENT_SCRIPT = """
import json, os, sys

changes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGE_EVENTS = {
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink",
    "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.copyfile",
    "shutil.copytree", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp",
}

def audit(event, args):
    if event in CHANGE_EVENTS:
        changes.append([event, repr(args)])
    elif event == "open" and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            changes.append([event, repr(args)])

sys.addaudithook(audit)

from tabserve import Client

url, state_path = sys.argv[1], sys.argv[2]

def triple(x):
    "Triple each value."
    return [3 * v for v in x]

with Client(url, query_timeout=60) as client:
    client.deploy("unseen", triple, "deployed without a shared filesystem")
    answer = client.query("unseen", [1, 2])
print(json.dumps({
    "state_visible": os.path.exists(state_path),
    "response": answer["response"],
    "changes": changes,
}))
"""


def _requests_seen(server: Server, until: str) -> list[str]:
    """The server's access log as "METHOD /path" lines, once ``until`` has been logged."""
    # Tornado logs a request just after sending the answer: allow the last line a moment.
    deadline = time.monotonic() + 10
    while True:
        lines = [
            " ".join(line.split()[4:6])
            for line in server.log().splitlines()
            if "tabserve.access" in line
        ]
        if until in lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_the_tabserve_client_deploys_to_a_server_whose_state_directory_it_cannot_see(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The client needs nothing from the server but HTTP.

    The proof has three parts:

    1. The client runs in its own process, in a new mount namespace in which the server's
       whole working directory (state.ini, query_objects/, staging/) is covered by an empty
       tmpfs: the path the server writes to does not exist for the client. Network
       namespaces are shared, so loopback HTTP still reaches the server. (Needs
       ``unshare --mount``, i.e. root or CAP_SYS_ADMIN; without it the path stays visible
       and only parts 2 and 3 hold.)
    2. An audit hook in the client process records every filesystem change and every file
       opened for writing: there must be none. TabPy's client writes the pickle into the
       server's upload directory, which is exactly what this rules out.
    3. The server never answered ``/configurations/endpoint_upload_destination`` and its
       staging directory stays empty, while the archive is in ``query_objects/`` and the
       endpoint answers.
    """
    server = server_factory(TABPY_EVALUATE_TIMEOUT="20")
    try:
        _deploy_from_elsewhere(server, tmp_path)
    finally:
        server.stop()


def _deploy_from_elsewhere(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "notebook.py"
    script.write_text(_CLIENT_SCRIPT)
    command = [sys.executable, str(script), server.url, str(server.state_path)]
    hidden = _unshare_works()
    if hidden:
        # sh's $0 is the directory to cover; "$@" is the client command.
        mount = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", mount, str(server.workdir), *command]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr

    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["response"] == [3, 6]
    assert report["changes"] == []
    assert report["state_visible"] is (not hidden)

    archive = server.state_path / "query_objects" / "unseen" / "1" / "pickle_archive"
    assert archive.is_file()
    staging = server.state_path / "staging"
    assert not staging.exists() or not any(staging.rglob("*"))
    assert _requests_seen(server, until="POST /query/unseen") == [
        "GET /info",  # the fixture's readiness probe
        "GET /endpoints",  # deploy: is the name taken?
        "POST /endpoints",  # deploy: the pickle, in the body
        "POST /query/unseen",
    ]
    info = server.get("/endpoints/unseen").json()
    assert info["description"] == "deployed without a shared filesystem"
    assert info["python_version"] == platform.python_version()
