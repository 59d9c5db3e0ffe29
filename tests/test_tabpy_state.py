"""A state directory written by the real TabPy (tests/fixtures/tabpy_state) loads and serves."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from helpers import Server, ServerFactory


@pytest.fixture(scope="module")
def tabpy_state_server(
    server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory, tabpy_fixtures: Path
) -> Server:
    state = tmp_path_factory.mktemp("tabpy") / "state"
    shutil.copytree(tabpy_fixtures / "tabpy_state", state)
    server = server_factory(TABSERVE_WORKERS="1", TABPY_STATE_PATH=str(state))
    deadline = time.monotonic() + 30
    while "LoadInProgress" in {s["status"] for s in server.get("/status").json().values()}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return server


def test_endpoints_and_docstrings_are_read_as_tabpy_wrote_them(tabpy_state_server: Server) -> None:
    endpoints = tabpy_state_server.get("/endpoints").json()
    assert set(endpoints) == {"add", "scale"}
    assert endpoints["add"]["docstring"] == "Add two lists element-wise."
    assert endpoints["add"]["description"] == "Element-wise sum of two lists"
    assert endpoints["scale"]["version"] == 2
    assert endpoints["scale"]["is_public"] is True
    assert endpoints["scale"]["schema"].startswith("{'input'")
    status = tabpy_state_server.get("/status").json()
    assert {name: s["status"] for name, s in status.items()} == {
        "add": "LoadSuccessful",
        "scale": "LoadSuccessful",
    }


def test_tabpy_pickles_serve_without_importing_tabpy(tabpy_state_server: Server) -> None:
    answer = tabpy_state_server.post("/query/add", json={"data": {"x": [1, 2], "y": [3, 4]}})
    assert answer.status_code == 200
    assert answer.json()["response"] == [4, 6]
    scaled = tabpy_state_server.post("/query/scale", json={"data": {"values": [1, 2], "factor": 2}})
    assert scaled.json()["version"] == 2
    assert scaled.json()["response"] == [3, 6]  # version 2 multiplies by factor + 1
    # One worker: the same process that unpickled TabPy's CustomQueryObject answers this.
    imported = tabpy_state_server.evaluate(
        "import sys\ntabpy.query('add', [1], [1])\n"
        "return sorted(m for m in sys.modules if m == 'tabpy' or m.startswith('tabpy.'))"
    )
    assert imported.json() == []


def test_tabpy_state_accepts_new_deploys_and_keeps_its_format(tabpy_state_server: Server) -> None:
    alias = tabpy_state_server.post(
        "/endpoints", json={"name": "plus", "type": "alias", "target": "add"}
    )
    assert alias.status_code == 201
    text = (tabpy_state_server.state_path / "state.ini").read_text()
    assert "[Query Objects Service Versions]" in text and "Name = TabPy Server" in text
    assert tabpy_state_server.post("/query/plus", json={"data": [[1], [2]]}).json()["response"] == [
        3
    ]
