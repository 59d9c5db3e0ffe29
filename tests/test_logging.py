"""The access log, call ids and error logging, read from a real server's log output."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import Server, ServerFactory
from tabserve.logs import AccessRecord, JsonFormatter, TextFormatter

SECRET_SCRIPT = "secret_marker = 'xyzzy-42'\nreturn [v + 1 for v in _arg1]"


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_line(path: Path, call_id: str, logger: str = "tabserve.access") -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            for line in json_lines(path):
                if line.get("call_id") == call_id and line["logger"] == logger:
                    return line
        time.sleep(0.05)
    raise AssertionError(f"no {logger} line for call {call_id} in\n{path.read_text()}")


@pytest.fixture(scope="module")
def json_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs") / "tabserve.jsonl"


@pytest.fixture(scope="module")
def json_server(server_factory: ServerFactory, json_log: Path) -> Server:
    return server_factory(TABSERVE_LOG_FORMAT="json", TABSERVE_LOG_FILE=str(json_log))


def test_request_id_is_echoed_or_generated(server: Server) -> None:
    given = server.get("/info", headers={"X-Request-Id": "tableau-7f3a.1"})
    assert given.headers["X-Request-Id"] == "tableau-7f3a.1"
    made = server.get("/info")
    assert len(made.headers["X-Request-Id"]) == 32
    assert made.headers["X-Request-Id"] != server.get("/info").headers["X-Request-Id"]
    # Something that could forge log content is replaced, not echoed.
    odd = server.get("/info", headers={"X-Request-Id": 'a b "c"'})
    assert odd.headers["X-Request-Id"] != 'a b "c"'
    assert len(odd.headers["X-Request-Id"]) == 32
    # Errors carry it too.
    missing = server.get("/nowhere", headers={"X-Request-Id": "err-1"})
    assert missing.status_code == 404
    assert missing.headers["X-Request-Id"] == "err-1"


def test_default_text_line_on_stderr(server: Server) -> None:
    response = server.evaluate("return _arg1", _arg1=[1, 2])
    call = response.headers["X-Request-Id"]
    deadline = time.monotonic() + 10
    while call not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if f"call_id={call}" in line)
    assert " INFO tabserve.access POST /evaluate 200 " in line
    for part in ("route=/evaluate", "rows_in=2", "rows_out=2", "worker_pid=", "script_hash="):
        assert part in line


def test_json_access_line_has_every_field(json_server: Server, json_log: Path) -> None:
    response = json_server.post(
        "/evaluate",
        json={"script": SECRET_SCRIPT, "data": {"_arg1": [1, 2, 3]}},
        headers={"X-Request-Id": "json-1", "TabPy-User": "alice", "TabPy-Client": "Tableau"},
    )
    assert response.status_code == 200
    line = wait_for_line(json_log, "json-1")
    assert line["level"] == "INFO"
    assert line["method"] == "POST"
    assert line["route"] == "/evaluate"
    assert line["status"] == 200
    assert line["rows_in"] == 3
    assert line["rows_out"] == 3
    assert line["bytes_in"] == len(response.request.body)
    assert line["bytes_out"] == len(response.content)
    assert line["worker_pid"] > 0
    assert line["queue_ms"] >= 0
    assert line["exec_ms"] >= 0
    assert line["duration_ms"] >= line["exec_ms"]
    assert len(line["script_hash"]) == 12
    # TABPY_LOG_DETAILS is off: no caller details, and never the script text at INFO.
    assert "user" not in line and "caller" not in line and "client" not in line
    assert "xyzzy-42" not in json_log.read_text()


def test_query_lines_name_endpoint_and_version(json_server: Server, json_log: Path) -> None:
    response = json_server.post(
        "/query/absent", json={"data": {}}, headers={"X-Request-Id": "q-404"}
    )
    assert response.status_code == 404
    line = wait_for_line(json_log, "q-404")
    assert line["route"] == "/query/{name}"
    assert line["path"] == "/query/absent"
    assert line["error"] == "UnknownURI"
    assert "endpoint" not in line or line["endpoint"] is None


def test_script_error_logs_one_traceback_and_answers_one_line(
    json_server: Server, json_log: Path
) -> None:
    response = json_server.post(
        "/evaluate",
        json={"script": "return undefined_name", "data": {}},
        headers={"X-Request-Id": "boom-1"},
    )
    assert response.status_code == 500
    assert response.json()["info"] == "NameError : name 'undefined_name' is not defined (line 1)"
    access = wait_for_line(json_log, "boom-1")
    assert access["level"] == "ERROR"
    assert access["error"] == "Error processing script"
    worker_line = wait_for_line(json_log, "boom-1", logger="tabserve.worker")
    assert "NameError" in worker_line["traceback"]
    lines = [line for line in json_lines(json_log) if line.get("call_id") == "boom-1"]
    assert sum("traceback" in line for line in lines) == 1


def test_log_details_add_caller_and_tableau_headers(server_factory: ServerFactory) -> None:
    server = server_factory(TABPY_LOG_DETAILS="true", TABSERVE_LOG_FORMAT="json")
    server.get("/info", headers={"X-Request-Id": "who-1", "TabPy-User": "bob smith",
                                 "TabPy-Client": "Tableau Desktop 2024.1"})  # fmt: skip
    deadline = time.monotonic() + 10
    found: dict[str, Any] = {}
    while not found and time.monotonic() < deadline:
        for raw in server.log().splitlines():
            if raw.startswith("{") and '"who-1"' in raw:
                found = json.loads(raw)
        time.sleep(0.05)
    assert found["caller"] == "127.0.0.1"
    assert found["user"] == "bob smith"
    assert found["client"] == "Tableau Desktop 2024.1"


def test_debug_level_logs_the_script_text(server_factory: ServerFactory) -> None:
    server = server_factory(TABSERVE_LOG_LEVEL="DEBUG")
    response = server.post(
        "/evaluate", json={"script": SECRET_SCRIPT, "data": {"_arg1": [1]}},
        headers={"X-Request-Id": "dbg-1"},
    )  # fmt: skip
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while "xyzzy-42" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "xyzzy-42" in server.log()
    assert "call=dbg-1" in server.log()


def _record(msg: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("bad")
        except ValueError:
            import sys

            info = sys.exc_info()
    record = logging.LogRecord("tabserve.access", logging.INFO, __file__, 1, msg, None, info)
    record.call_id = "c1"
    return record


def test_header_values_cannot_break_or_forge_a_text_line() -> None:
    fields = {"call_id": "c1", "user": 'eve\nINFO forged line "x"', "route": "/info"}
    line = TextFormatter().format(_record(AccessRecord("GET /info 200 1.0ms", fields)))
    assert "\n" not in line
    assert 'user="eve\\nINFO forged line \\"x\\""' in line
    assert "route=/info" in line


def test_json_lines_carry_tracebacks_and_plain_messages() -> None:
    document = json.loads(JsonFormatter().format(_record("plain %s", exc=True)))
    assert document["message"] == "plain %s"
    assert document["call_id"] == "c1"
    assert "ValueError: bad" in document["traceback"]


def test_unexpected_errors_are_summarised_with_the_call_id() -> None:
    from tabserve.server.handlers.base import _as_tabserve_error

    secret = RuntimeError("/etc/tabserve/secret.key is unreadable")
    error = _as_tabserve_error(500, (RuntimeError, secret, None), "call-77")
    assert error.envelope() == {
        "message": "Internal server error",
        "info": "The server failed; its log has the details under call call-77.",
    }


def test_text_time_stamps_are_the_stdlib_format() -> None:
    record = _record("plain")
    mine = TextFormatter().formatTime(record)
    assert mine == logging.Formatter().formatTime(record)
    assert TextFormatter().formatTime(record, "%H") == logging.Formatter().formatTime(record, "%H")


def test_lines_of_one_loop_turn_are_written_together_in_order(tmp_path: Path) -> None:
    import asyncio

    from tabserve import logs

    path = tmp_path / "turn.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure("INFO", "text", path)
    try:
        logging.getLogger("t").info("outside a loop: at once")
        assert path.read_text().count("\n") == 1

        async def one_turn() -> tuple[str, str, str]:
            logging.getLogger("t").info("first")
            logging.getLogger("t").info("second")
            kept = path.read_text()  # still kept: written at the end of this turn
            logging.getLogger("t").warning("third")  # a warning writes everything at once
            after_warning = path.read_text()
            logging.getLogger("t").info("fourth")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return kept, after_warning, path.read_text()

        kept, after_warning, final = asyncio.run(one_turn())
        assert "first" not in kept
        assert after_warning.index("first") < after_warning.index("second")
        assert after_warning.index("second") < after_warning.index("third")
        assert "fourth" not in after_warning
        assert final.rstrip().endswith("fourth")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
