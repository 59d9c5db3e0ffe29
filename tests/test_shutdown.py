"""Graceful shutdown of a real server: finish what is in flight, then stop every worker."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from helpers import Server, ServerFactory


def wait_until_busy(server: Server, workers: int = 1) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("tabserve_workers_busy") >= workers:
            return
        time.sleep(0.05)
    raise AssertionError("the slow request never reached a worker")


def exit_code(server: Server, seconds: float) -> int:
    try:
        return server.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tabserve did not exit within {seconds} s:\n{server.log()}")


def assert_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in pids):
        time.sleep(0.05)
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_in_flight_request_finishes_then_everything_stops(
    server_factory: ServerFactory, sig: signal.Signals
) -> None:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="20", TABSERVE_SHUTDOWN_GRACE="15")
    workers = server.worker_pids()
    assert len(workers) == 2
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(server.evaluate, "import time\ntime.sleep(2)\nreturn [1]")
        wait_until_busy(server)
        server.process.send_signal(sig)
        time.sleep(0.3)
        # 1. no longer accepting
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health/live", timeout=2)
        # 2. the request in flight still completes
        response = slow.result(timeout=30)
    assert response.status_code == 200
    assert response.json() == [1]
    # 3 and 4. the workers are stopped and the process exits 0
    assert exit_code(server, 15) == 0
    assert_gone(workers)
    assert "requests in flight" in server.log()


def test_readiness_fails_while_draining(server_factory: ServerFactory) -> None:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="20", TABSERVE_SHUTDOWN_GRACE="15")
    with requests.Session() as session, ThreadPoolExecutor(max_workers=1) as pool:
        assert session.get(server.url + "/health/ready", timeout=5).status_code == 200
        slow = pool.submit(server.evaluate, "import time\ntime.sleep(2)\nreturn [1]")
        wait_until_busy(server)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # The kept-alive connection still reaches the draining server.
        response = session.get(server.url + "/health/ready", timeout=5)
        assert response.status_code == 503
        assert response.headers["Connection"] == "close"
        failed = [check["name"] for check in response.json()["checks"] if not check["ok"]]
        assert failed == ["accepting"]
        assert slow.result(timeout=30).status_code == 200
    assert exit_code(server, 15) == 0


def test_grace_period_bounds_the_wait(server_factory: ServerFactory) -> None:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="60", TABSERVE_SHUTDOWN_GRACE="1")
    workers = server.worker_pids()
    with ThreadPoolExecutor(max_workers=1) as pool:
        stuck = pool.submit(server.evaluate, "while True: pass")
        wait_until_busy(server)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert exit_code(server, 20) == 0
        # Grace (1 s) plus the workers' stop (at most 2 s) plus start-up slack: far below 60.
        assert time.monotonic() - started < 15
        with pytest.raises(requests.ConnectionError):
            stuck.result(timeout=30)
    assert_gone(workers)
    assert "still in flight after 1 s" in server.log()


def test_a_second_signal_skips_the_rest_of_the_grace(server_factory: ServerFactory) -> None:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="60", TABSERVE_SHUTDOWN_GRACE="60")
    workers = server.worker_pids()
    with ThreadPoolExecutor(max_workers=1) as pool:
        stuck = pool.submit(server.evaluate, "while True: pass")
        wait_until_busy(server)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        assert exit_code(server, 20) == 0
        assert time.monotonic() - started < 15  # not the 60 s grace
        with pytest.raises(requests.ConnectionError):
            stuck.result(timeout=30)
    assert_gone(workers)
    assert "second signal" in server.log()
