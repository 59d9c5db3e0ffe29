"""GET /openapi.json: it matches the live routes and docs/api.md, and a fuzzer finds no answer
that contradicts it (schemathesis against a live server)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from helpers import InProcessServer, Server, ServerFactory
from tabserve.server import openapi
from tabserve.server.routes import ROUTES, Route, route_for

API_DOC = Path(__file__).parent.parent / "docs" / "api.md"
METHODS = ("get", "post", "put", "delete", "patch")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(x: list[float], y: list[float]) -> list[float]:
    return [a + b for a, b in zip(x, y, strict=True)]


def test_every_route_and_its_methods_are_documented() -> None:
    """The document's paths are the route table's, each with the verbs its handler serves."""
    paths = openapi.document(ROUTES)["paths"]
    assert list(paths) == [route.path for route in ROUTES]
    for route in ROUTES:
        assert {m for m in paths[route.path] if m in METHODS} == set(route.methods), route.path
        public = all(op.get("security") == [{}] for m, op in paths[route.path].items()
                     if m in METHODS)  # fmt: skip
        assert public is (route.public is True), route.path
    assert route_for("/endpoints/{name}").methods == ("get", "put", "delete")
    assert route_for("/query/{name}").methods == ("get", "post")


def test_route_patterns_match_their_paths_and_nothing_more() -> None:
    for route in ROUTES:
        example = route.path.replace("{name}", "add")
        assert re.fullmatch(route.pattern, example), route.path
        assert not re.fullmatch(route.pattern, example + "/x"), route.path
    assert re.fullmatch(route_for("/endpoints").pattern, "/endpoints/")
    assert not re.fullmatch(route_for("/openapi.json").pattern, "/openapiXjson")


def test_a_route_without_a_description_stops_the_document() -> None:
    undocumented = Route("/undocumented", route_for("/info").handler)
    with pytest.raises(ValueError, match="not the routed ones"):
        openapi.document((*ROUTES, undocumented))


def test_a_guarded_verb_without_a_403_stops_the_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A permission in the route table, a token's included, can be refused: the operation
    must list 403. Every authenticated operation lists it, since an endpoint API key is
    refused with 403 wherever its route does not allow it."""
    paths = openapi.document(ROUTES)["paths"]
    for route in ROUTES:
        if route.public is not True:
            for verb in route.methods:
                assert "403" in paths[route.path][verb]["responses"], (route.path, verb)
    operations = openapi._operations()
    del operations["/info"]["get"]["responses"]["403"]
    monkeypatch.setattr(openapi, "_operations", lambda: operations)
    guarded = Route("/info", route_for("/info").handler, token_permissions={"GET": "manage"})
    routes = tuple(guarded if route.path == "/info" else route for route in ROUTES)
    with pytest.raises(ValueError, match="lists no 403"):
        openapi.document(routes)


def test_only_result_downloads_take_a_key_in_the_query_string() -> None:
    document = openapi.document(ROUTES)
    assert {"api_key": []} not in document["security"]
    taking = sorted(path for path, operations in document["paths"].items()
                    for verb, operation in operations.items() if verb in METHODS
                    and {"api_key": []} in operation.get("security", []))  # fmt: skip
    assert taking == ["/query_results/{id}.csv", "/query_results/{id}.json"]


def test_bearer_tokens_are_a_security_scheme() -> None:
    components = openapi.document(ROUTES)["components"]
    assert components["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert {"bearer": []} in openapi.document(ROUTES)["security"]


def api_md_headings(text: str) -> set[tuple[str, str]]:
    """(METHOD, path) from headings such as '## GET /a, GET /b/<name>' or '## GET|POST /q'."""
    found = set()
    for heading in re.findall(r"^## (.*)$", text, re.M):
        for methods, path in re.findall(
            r"((?:GET|POST|PUT|DELETE)(?:\|[A-Z]+)*) (/[^\s,]*)", heading
        ):
            for method in methods.split("|"):
                found.add((method, re.sub(r"<([a-z_]+)>", r"{\1}", path)))
    return found


def test_api_md_and_the_document_name_the_same_routes() -> None:
    text = API_DOC.read_text()
    headed = api_md_headings(text)
    assert ("DELETE", "/endpoints/{name}") in headed
    paths = openapi.document(ROUTES)["paths"]
    for method, path in headed:
        assert method.lower() in paths.get(path, {}), f"api.md's {method} {path} not in the doc"
    for path, operations in paths.items():
        for method in operations:
            if method in METHODS:
                assert f"`{method.upper()} {path}`" in text or (method.upper(), path) in headed, (
                    f"{method.upper()} {path} is in /openapi.json but not in docs/api.md"
                )


def test_document_is_served(app: InProcessServer) -> None:
    answer = app.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = answer.json()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == app.get("/info").json()["server_version"]
    assert document == openapi.document(ROUTES)


@pytest.fixture(scope="module")
def fuzz_server(server_factory: ServerFactory) -> Server:
    # A short timeout: random scripts are fine (script errors), but none may hold a worker.
    server = server_factory(TABPY_EVALUATE_TIMEOUT="2", TABPY_MAX_REQUEST_SIZE_MB="1")
    # The document's example name, deployed, so that the fuzzer reaches /query's real work.
    body = {
        "name": "add",
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(add)).decode(),
        "docstring": "Add two columns.",
    }
    assert server.post("/endpoints", json=body).status_code == 201
    return server


@pytest.mark.slow
def test_schemathesis_finds_no_answer_outside_the_document(
    fuzz_server: Server, tmp_path: Path
) -> None:
    """Undocumented statuses (so any 5xx but script errors), wrong content types and bodies
    that break their schema all fail; the 500 schema admits only 'Error processing script'."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{fuzz_server.url}/openapi.json",
        "--checks",
        "status_code_conformance,content_type_conformance,response_schema_conformance,"
        "response_headers_conformance",
        # Bounded by examples, not by time: --max-time is a budget that fuzzing and stateful
        # testing repeat to fill (always a minute), and how much of it a loaded machine fills
        # differs from run to run. With the seed, the cases are the same every run.
        "--max-examples",
        "10",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--seed",
        "20261123",
        "--no-shrink",
        "--suppress-health-check",
        "all",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=tmp_path, stdin=subprocess.DEVNULL
    )
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    # Every operation was exercised (schemathesis does not test the schema's own URL).
    selected = re.search(r"Selected: (\d+)/(\d+)", done.stdout)
    tested = re.search(r"Tested: (\d+)", done.stdout)
    assert selected and tested, output
    assert selected[1] == selected[2] == tested[1], output
    assert int(tested[1]) >= 16, output
    # The server survived the run and logged no unexpected exception.
    assert fuzz_server.get("/info").status_code == 200
    assert "Uncaught exception" not in fuzz_server.log()


def test_fuzzer_finding_unencodable_src_path_is_a_400(app: InProcessServer) -> None:
    """schemathesis found this 500: realpath raised on a NUL or a lone surrogate."""
    for src_path in ("/tmp/a\u0000b", "/tmp/\udb21x"):
        answer = app.post(
            "/endpoints", json={"name": "fuzzed", "type": "model", "src_path": src_path}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["message"] == "src_path is not a valid path."
