"""/health/live and /health/ready over HTTP (in process), and the readiness check list itself."""

from __future__ import annotations

import asyncio

from helpers import AppFactory, InProcessServer
from tabserve.server.health import Readiness


def test_live_answers_200_without_credentials(app: InProcessServer) -> None:
    response = app.get("/health/live")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"status": "alive"}
    assert "Etag" not in response.headers


def test_ready_lists_every_check_when_ready(app: InProcessServer) -> None:
    response = app.get("/health/ready")
    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "ready"
    checks = {check["name"]: check for check in document["checks"]}
    assert list(checks) == ["store", "workers", "sandbox", "accepting"]
    assert all(check["ok"] for check in checks.values())
    assert checks["workers"]["detail"] == "2 of 2 workers alive"


def test_ready_is_503_with_the_reason_when_state_is_gone(app_factory: AppFactory) -> None:
    server = app_factory()
    assert server.get("/health/ready").status_code == 200
    state_file = server.state_path / "state.ini"
    saved = state_file.read_bytes()
    state_file.unlink()
    try:
        response = server.get("/health/ready")
        assert response.status_code == 503
        document = response.json()
        assert document["status"] == "not ready"
        failed = [check for check in document["checks"] if not check["ok"]]
        assert [check["name"] for check in failed] == ["store"]
        assert "state.ini is missing" in failed[0]["detail"]
        # Liveness is unaffected: restarting the process would not bring the file back.
        assert server.get("/health/live").status_code == 200
    finally:
        state_file.write_bytes(saved)
    assert server.get("/health/ready").status_code == 200


def test_checks_plug_in_by_name_and_a_broken_check_means_not_ready() -> None:
    readiness = Readiness()
    readiness.add("sandbox", lambda: (True, "placeholder"))
    readiness.add("other", lambda: (True, "fine"))

    async def sandbox() -> tuple[bool, str]:
        return False, "self-check failed: network reachable"

    readiness.add("sandbox", sandbox)  # replaces the placeholder, keeps its place
    ready, outcomes = asyncio.run(readiness.run())
    assert not ready
    assert [(o.name, o.ok, o.detail) for o in outcomes] == [
        ("sandbox", False, "self-check failed: network reachable"),
        ("other", True, "fine"),
    ]

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    readiness.add("sandbox", broken)
    ready, outcomes = asyncio.run(readiness.run())
    assert not ready
    assert outcomes[0].detail == "the check itself failed: RuntimeError"
