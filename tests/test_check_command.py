"""``tabserve check``: the conformance kit, run as a command against live servers (a real
one, and variants of the app in process)."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cloudpickle
import pytest

from helpers import AppFactory, Server, ServerFactory
from tabserve.store.passwords import add_user

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def scale(x: list[float], y: list[float]) -> list[float]:
    return [a * b for a, b in zip(x, y, strict=True)]


def run_check(*args: str) -> tuple[int, dict[str, str], str]:
    """Run the kit; return its exit code, {check name: result} and the whole output."""
    done = subprocess.run(
        [sys.executable, "-m", "tabserve", "check", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    results = {}
    for line in done.stdout.splitlines():
        for result in ("PASS", "FAIL", "SKIP"):
            name, sep, _ = line.partition(f"  {result}  ")
            if sep:
                results[name.strip()] = result
    return done.returncode, results, done.stdout + done.stderr


@pytest.fixture(scope="module")
def check_server(server_factory: ServerFactory) -> Server:
    server = server_factory(TABPY_MAX_REQUEST_SIZE_MB="1", TABPY_EVALUATE_TIMEOUT="20")
    body = {
        "name": "scale",
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(scale)).decode(),
    }
    assert server.post("/endpoints", json=body).status_code == 201
    return server


def test_everything_passes_against_tabserve(check_server: Server) -> None:
    code, results, output = run_check(
        "--target", check_server.url, "--max-request-mb", "1", "--endpoint", "scale"
    )
    assert code == 0, output
    assert len(results) == 16, output
    assert results["MODEL_EXTENSION: POST /query/NAME"] == "PASS"
    assert results["413 just over the request size limit"] == "PASS"
    assert results["JSON body sent as form-urlencoded"] == "PASS"
    assert results["result-length rule"] == "PASS"
    # Only the disabled-evaluate check does not apply to this server.
    assert [name for name, r in results.items() if r != "PASS"] == ["evaluate_enabled: false"]


def test_passes_with_authentication_on(app_factory: AppFactory, tmp_path: Path) -> None:
    passwords = tmp_path / "passwords.txt"
    add_user(passwords, "tableau", "kit-pass")
    server = app_factory(TABPY_PWD_FILE=str(passwords), TABPY_MAX_REQUEST_SIZE_MB="1")
    code, results, output = run_check(
        "--target",
        server.url,
        "--user",
        "tableau",
        "--password",
        "kit-pass",
        "--max-request-mb",
        "1",
    )
    assert code == 0, output
    assert results["auth: probe and 401/406 rules"] == "PASS"
    assert "401 without or with wrong credentials" in output
    # Without --user the kit says what is missing.
    code, results, output = run_check("--target", server.url, "--max-request-mb", "1")
    assert code == 1
    assert "pass --user and --password" in output


def test_evaluate_disabled_server(app_factory: AppFactory) -> None:
    server = app_factory(TABPY_EVALUATE_ENABLE="false", TABPY_MAX_REQUEST_SIZE_MB="1")
    code, results, output = run_check("--target", server.url, "--max-request-mb", "1")
    assert code == 0, output
    assert results["evaluate_enabled: false"] == "PASS"
    assert results["SCRIPT_REAL: list with nulls"] == "SKIP"
    assert results["413 just over the request size limit"] == "PASS"


class _Sloppy(BaseHTTPRequestHandler):
    """A server that answers 200 [] to everything: what the kit must not call conformant."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 1 << 20:
            self.rfile.read(length)
        body = (
            b'{"description": "", "creation_time": "0", "state_path": "/", '
            b'"server_version": "0", "name": "sloppy", '
            b'"versions": {"v1": {"features": {"evaluate_enabled": true, "gzip_enabled": true}}}}'
            if self.path == "/info"
            else b"[]"
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sloppy_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Sloppy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_failures_are_reported_and_exit_nonzero(sloppy_url: str) -> None:
    code, results, output = run_check("--target", sloppy_url, "--max-request-mb", "1")
    assert code == 1, output
    assert results["Test Connection: GET /info"] == "PASS"
    for name in (
        "auth: probe and 401/406 rules",
        "SCRIPT_REAL: list with nulls",
        "result-length rule",
        "Table Extension",
        "413 just over the request size limit",
    ):
        assert results[name] == "FAIL", output
    assert "expected 406, got 200" in output


def test_unreachable_target_exits_2() -> None:
    from helpers import free_port

    code, _, output = run_check("--target", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert "cannot reach" in output
