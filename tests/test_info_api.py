"""GET /info (Tableau's Test Connection) and CORS headers from state.ini, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from helpers import AppFactory, InProcessServer
from tabserve import __version__

FIXTURES = Path(__file__).parent / "fixtures"


def test_info_has_exactly_tabpys_shape(app: InProcessServer) -> None:
    response = app.get("/info")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == [
        "description", "creation_time", "state_path", "server_version", "name", "versions",
    ]  # fmt: skip
    assert body["creation_time"] == "0" and isinstance(body["creation_time"], str)
    assert body["server_version"] == __version__
    assert body["state_path"] == str(app.state_path.resolve())
    assert body["versions"] == {
        "v1": {"features": {"evaluate_enabled": True, "gzip_enabled": True, "arrow_enabled": False}}
    }


def test_info_matches_the_recorded_tabpy_answer_key_for_key(app: InProcessServer) -> None:
    recorded = next(
        r for r in json.loads((FIXTURES / "tabpy_responses.json").read_text())
        if r["method"] == "GET" and r["path"] == "/info"
    )  # fmt: skip
    tabpy = json.loads(recorded["response_body"])
    ours = app.get("/info").json()
    assert list(ours) == list(tabpy)
    assert ours["versions"] == tabpy["versions"]


@pytest.fixture(scope="module")
def cors_server(
    app_factory: AppFactory, tmp_path_factory: pytest.TempPathFactory
) -> InProcessServer:
    state = tmp_path_factory.mktemp("cors")
    (state / "state.ini").write_text(
        "[Service Info]\nName = Sales 100% server\nDescription = forecasts\n"
        "Creation Time = 1700000000\nAccess-Control-Allow-Origin = https://tableau.example\n"
        "Access-Control-Allow-Headers = Authorization, Content-Type\n"
        "Access-Control-Allow-Methods = GET, POST, OPTIONS\n"
    )
    return app_factory(TABSERVE_WORKERS="1", TABPY_STATE_PATH=str(state))


def test_service_info_comes_from_state_ini(cors_server: InProcessServer) -> None:
    body = cors_server.get("/info").json()
    assert (body["name"], body["description"], body["creation_time"]) == (
        "Sales 100% server", "forecasts", "1700000000",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/info"), ("POST", "/evaluate"), ("OPTIONS", "/evaluate"), ("GET", "/status")],
)
def test_cors_headers_are_sent(cors_server: InProcessServer, method: str, path: str) -> None:
    body = {"script": "return 1", "data": {}} if method == "POST" else None
    response = requests.request(method, cors_server.url + path, json=body, timeout=10)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://tableau.example"
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"


def test_no_cors_headers_when_not_configured(app: InProcessServer) -> None:
    assert "Access-Control-Allow-Origin" not in app.get("/info").headers
