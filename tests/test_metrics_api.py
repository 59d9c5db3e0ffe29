"""/metrics over real HTTP: Prometheus text, counted in the server across all workers."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tabpy.tabpy_tools.client import Client

from helpers import InProcessServer, Server, ServerFactory
from tabserve.server.executor import Executor, PoolConfig
from tabserve.server.metrics import Metrics

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Sleeps so that two requests overlap, and answers with the pid of the worker that ran it.
PID_SCRIPT = "import os, time\ntime.sleep(0.2)\nreturn [os.getpid()] * len(_arg1)"


def doubled(x: list[float]) -> list[float]:
    return [2 * v for v in x]


@pytest.fixture(scope="module")
def metered(server_factory: ServerFactory) -> Server:
    return server_factory(TABPY_EVALUATE_TIMEOUT="2", TABSERVE_WORKERS="2")


def wait_for(predicate: object, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_metrics_is_prometheus_text_with_every_family(metered: Server) -> None:
    response = metered.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    expected = {
        "tabserve_requests",
        "tabserve_request_duration_seconds",
        "tabserve_endpoint_duration_seconds",
        "tabserve_requests_in_flight",
        "tabserve_queue_depth",
        "tabserve_workers",
        "tabserve_workers_busy",
        "tabserve_worker_restarts",
        "tabserve_timeouts",
        "tabserve_worker_kills",
        "tabserve_worker_crashes",
        "tabserve_rows_in",
        "tabserve_rows_out",
        "tabserve_request_bytes",
        "tabserve_response_bytes",
    }
    assert expected <= names
    assert metered.metric("tabserve_workers") == 2


def test_counts_add_up_across_two_workers(metered: Server) -> None:
    before = {
        "ok": metered.metric(
            "tabserve_requests_total", route="/evaluate", method="POST", status="200"
        ),
        "rows_in": metered.metric("tabserve_rows_in_total"),
        "rows_out": metered.metric("tabserve_rows_out_total"),
        "bytes_in": metered.metric("tabserve_request_bytes_total"),
        "bytes_out": metered.metric("tabserve_response_bytes_total"),
        "latency": metered.metric("tabserve_request_duration_seconds_count", route="/evaluate"),
    }
    body = json.dumps({"script": PID_SCRIPT, "data": {"_arg1": [1, 2, 3]}}).encode()
    calls = 12
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: metered.post("/evaluate", data=body), range(calls)))
    assert [r.status_code for r in responses] == [200] * calls
    pids = {r.json()[0] for r in responses}
    assert len(pids) == 2, "both workers must have served requests"
    assert (
        metered.metric("tabserve_requests_total", route="/evaluate", method="POST", status="200")
        == before["ok"] + calls
    )
    assert metered.metric("tabserve_rows_in_total") == before["rows_in"] + 3 * calls
    assert metered.metric("tabserve_rows_out_total") == before["rows_out"] + 3 * calls
    assert metered.metric("tabserve_request_bytes_total") == before["bytes_in"] + len(body) * calls
    sent = sum(len(r.content) for r in responses)
    # The response to the /metrics scrapes in between is counted too, so at least this much.
    assert metered.metric("tabserve_response_bytes_total") >= before["bytes_out"] + sent
    latency_count = metered.metric("tabserve_request_duration_seconds_count", route="/evaluate")
    assert latency_count == before["latency"] + calls


def test_routes_are_patterns_not_raw_paths(metered: Server) -> None:
    assert metered.post("/query/no-such-thing", json={"data": {}}).status_code == 404
    assert metered.get("/some/random/path").status_code == 404
    text = metered.get("/metrics").text
    assert 'route="/query/{name}"' in text
    assert 'route="unmatched"' in text
    assert "no-such-thing" not in text
    assert "random" not in text
    # An unknown endpoint never becomes a label of the per-endpoint histogram.
    assert metered.metric("tabserve_endpoint_duration_seconds_count", endpoint="no-such-thing") == 0


def test_endpoint_latency_is_per_deployed_endpoint(metered: Server) -> None:
    Client(metered.url + "/").deploy("doubled", doubled, "doubles", override=True)
    for _ in range(3):
        response = metered.post("/query/doubled", json={"data": {"x": [1, 2]}})
        assert response.status_code == 200
        assert response.json()["response"] == [2, 4]
    assert metered.metric("tabserve_endpoint_duration_seconds_count", endpoint="doubled") == 3
    assert (
        metered.metric(
            "tabserve_requests_total", route="/query/{name}", method="POST", status="200"
        )
        == 3
    )


def test_timeouts_crashes_and_kills(metered: Server) -> None:
    timeouts = metered.metric("tabserve_timeouts_total")
    kills = metered.metric("tabserve_worker_kills_total")
    crashes = metered.metric("tabserve_worker_crashes_total")
    restarts = metered.metric("tabserve_worker_restarts_total")
    assert metered.evaluate("while True: pass").status_code == 408
    assert metered.evaluate("import os\nos._exit(3)").status_code == 500
    assert metered.metric("tabserve_timeouts_total") == timeouts + 1
    assert metered.metric("tabserve_worker_crashes_total") == crashes + 1
    assert metered.metric("tabserve_worker_kills_total") == kills + 2
    assert wait_for(lambda: metered.metric("tabserve_worker_restarts_total") == restarts + 2)
    assert wait_for(lambda: metered.metric("tabserve_workers") == 2)


def test_a_worker_killed_while_idle_is_counted_and_replaced(metered: Server) -> None:
    assert wait_for(lambda: metered.metric("tabserve_workers") == 2)
    crashes = metered.metric("tabserve_worker_crashes_total")
    victim = min(metered.worker_pids())
    os.kill(victim, signal.SIGKILL)
    # No request needed: the pool notices the death and starts a replacement by itself.
    assert wait_for(lambda: metered.metric("tabserve_worker_crashes_total") == crashes + 1)
    assert wait_for(lambda: metered.metric("tabserve_workers") == 2)
    assert victim not in metered.worker_pids()


def test_in_flight_queue_and_busy_while_requests_wait(server_factory: ServerFactory) -> None:
    server = server_factory(TABSERVE_WORKERS="1", TABPY_EVALUATE_TIMEOUT="20")
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(server.evaluate, "import time\ntime.sleep(2)\nreturn 1") for _ in "ab"]
        assert wait_for(lambda: server.metric("tabserve_queue_depth") == 1, 10)
        assert server.metric("tabserve_workers_busy") == 1
        # The two waiting requests, plus the scrape itself.
        assert server.metric("tabserve_requests_in_flight") == 3
        assert [f.result().status_code for f in slow] == [200, 200]
    assert server.metric("tabserve_queue_depth") == 0
    assert server.metric("tabserve_workers_busy") == 0
    assert server.metric("tabserve_requests_in_flight") == 1


def test_each_app_has_its_own_registry() -> None:
    config = PoolConfig(workers=1, request_limit=1024)
    first = Metrics(Executor(config), lambda: 0)
    second = Metrics(Executor(config), lambda: 0)
    first.observe("/evaluate", "POST", 200, 0.01, 10, 20, {"rows_in": 4, "rows_out": 4})
    assert b'tabserve_requests_total{method="POST",route="/evaluate",status="200"} 1.0' in (
        first.exposition()
    )
    assert b"tabserve_rows_in_total 4.0" in first.exposition()
    assert b'route="/evaluate"' not in second.exposition()
    assert b"tabserve_rows_in_total 0.0" in second.exposition()


def test_metrics_credentials_follow_the_setting_and_probes_never_need_them() -> None:
    from tabserve.config import load_settings
    from tabserve.server.routes import route_for

    assert route_for("/health/live").public is True and route_for("/health/ready").public is True
    for raw, public in (("true", False), ("false", True)):
        settings = load_settings(None, {"TABSERVE_METRICS_AUTH": raw})
        assert route_for("/metrics").is_public(settings) is public
    assert load_settings(None, {}).metrics_auth is True


def test_made_up_methods_do_not_create_series(app: InProcessServer) -> None:
    for method in ("FOO1", "FOO2", "BREW"):
        assert requests.request(method, app.url + "/info", timeout=10).status_code == 405
    text = app.get("/metrics").text
    assert 'method="FOO1"' not in text and 'method="BREW"' not in text
    assert 'method="other"' in text
