"""Workers killed from outside with SIGKILL, as the out-of-memory killer does.

Idle: the pool replaces the worker by itself. Busy: the caller gets a clear 500 naming the
kill, and the pool heals. Either way nothing else is disturbed and readiness recovers.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import Server, ServerFactory

pytestmark = [pytest.mark.fault]

ROUNDS = 5


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def healed(server: Server, workers: int = 2) -> None:
    assert wait_for(lambda: server.metric("tabserve_workers") == workers)
    assert wait_for(lambda: server.get("/health/ready").status_code == 200)
    for _ in range(workers * 2):  # every worker answers
        assert server.evaluate("return [sum(_arg1)]", _arg1=[1, 2]).json() == [3]


@pytest.fixture(scope="module", params=["fresh", "zygote"])
def pool_server(server_factory: ServerFactory, request: pytest.FixtureRequest) -> Server:
    """One server per launch mode: workers started fresh, or forked by the zygote (which
    ``worker_pids`` leaves out: killing it is test_zygote.py's business)."""
    return server_factory(TABPY_EVALUATE_TIMEOUT="60", TABSERVE_WORKER_LAUNCH=request.param)


def test_idle_workers_killed_from_outside_are_replaced(pool_server: Server) -> None:
    counts: Counter[str] = Counter()
    restarts = pool_server.metric("tabserve_worker_restarts_total")
    for _ in range(ROUNDS):
        healed(pool_server)
        victim = min(pool_server.worker_pids())
        os.kill(victim, signal.SIGKILL)
        counts["idle workers killed"] += 1
        assert wait_for(lambda v=victim: v not in pool_server.worker_pids())  # type: ignore[misc]
        healed(pool_server)
    replaced = pool_server.metric("tabserve_worker_restarts_total") - restarts
    counts["replacements"] = int(replaced)
    print(f"\n{dict(counts)}")
    assert replaced == ROUNDS


SLOW = """
import os, time
with open({path!r}, "w") as handle:
    handle.write(str(os.getpid()))
time.sleep(50)
return [1]
"""


def test_busy_workers_killed_from_outside_fail_only_their_request(
    pool_server: Server, tmp_path: Path
) -> None:
    counts: Counter[str] = Counter()
    restarts = pool_server.metric("tabserve_worker_restarts_total")
    for round_ in range(ROUNDS):
        healed(pool_server)
        marker = tmp_path / f"pid{round_}"
        with ThreadPoolExecutor(max_workers=2) as pool:
            doomed = pool.submit(pool_server.evaluate, SLOW.format(path=str(marker)))
            assert wait_for(lambda m=marker: m.exists() and m.read_text() != "")  # type: ignore[misc]
            # The other worker still answers while this one is busy.
            bystander = pool.submit(pool_server.evaluate, "return [42]")
            assert bystander.result(timeout=30).json() == [42]
            os.kill(int(marker.read_text()), signal.SIGKILL)
            response = doomed.result(timeout=30)
        counts[f"killed busy: {response.status_code}"] += 1
        assert response.status_code == 500, response.text
        error = response.json()
        assert "SIGKILL" in error["info"], error
        assert "died" in error["message"] or "killed" in error["info"], error
        healed(pool_server)
    counts["replacements"] = int(pool_server.metric("tabserve_worker_restarts_total") - restarts)
    print(f"\n{dict(counts)}")
    assert counts["replacements"] == ROUNDS
