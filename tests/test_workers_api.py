"""Worker processes seen from outside: runaways are killed, crashes are contained."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from helpers import Server, ServerFactory


def busy_processes(server: Server, interval: float = 0.5) -> list[tuple[int, float]]:
    """Processes of the server's tree using more than a fifth of a CPU over ``interval``."""
    root = psutil.Process(server.process.pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.cpu_percent(None)
        except psutil.NoSuchProcess:
            pass
    time.sleep(interval)
    busy = []
    for process in tree:
        try:
            usage = process.cpu_percent(None)
        except psutil.NoSuchProcess:
            continue
        if usage > 20:
            busy.append((process.pid, usage))
    return busy


@pytest.fixture(scope="module", params=["fresh", "zygote"])
def runaway_server(server_factory: ServerFactory, request: pytest.FixtureRequest) -> Server:
    return server_factory(
        TABPY_EVALUATE_TIMEOUT="1", TABSERVE_WORKERS="2", TABSERVE_WORKER_LAUNCH=request.param
    )


@pytest.fixture(scope="module", params=["fresh", "zygote"])
def crash_server(server_factory: ServerFactory, request: pytest.FixtureRequest) -> Server:
    """Crashes (and parallel sleeps) need no short timeout: 30 s keeps a loaded machine from
    turning a call that should succeed into a 408 (a timeout is what runaway_server tests)."""
    return server_factory(
        TABPY_EVALUATE_TIMEOUT="30", TABSERVE_WORKERS="2", TABSERVE_WORKER_LAUNCH=request.param
    )


def cpu_goes_idle(server: Server, within: float = 15) -> bool:
    """True once no process of the server's tree is busy, polled until ``within`` s: a
    runaway that was not killed never goes idle; a replacement worker's imports soon do."""
    deadline = time.monotonic() + within
    while busy_processes(server):
        if time.monotonic() > deadline:
            return False
    return True


def wait_for_workers(server: Server, workers: int = 2) -> None:
    """A replacement worker takes a moment to start (longer on newer Pythons, which import
    numpy and pandas more slowly); wait until every worker answers a call at once. Each call
    holds its worker a moment, so that one ready worker cannot answer them all in turn: the
    answers must come from as many processes as there are workers."""
    script = "import os, time\ntime.sleep(0.2)\nreturn os.getpid()"
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(workers) as pool:
        while time.monotonic() < deadline:
            calls = [pool.submit(server.evaluate, script) for _ in range(workers)]
            answers = [call.result() for call in calls]
            if all(answer.status_code == 200 for answer in answers):
                if len({answer.json() for answer in answers}) == workers:
                    return
            time.sleep(0.1)
    raise AssertionError(f"{workers} workers did not all answer within 30 s")


def test_runaway_is_408_and_the_cpu_goes_idle(runaway_server: Server) -> None:
    response = runaway_server.evaluate("while True: pass")
    assert response.status_code == 408
    assert response.json()["message"] == "User defined script timed out. Timeout is set to 1.0 s."
    assert cpu_goes_idle(runaway_server), busy_processes(runaway_server)
    wait_for_workers(runaway_server)


def test_runaway_children_are_killed_too(runaway_server: Server) -> None:
    script = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "while True: pass"
    )
    assert runaway_server.evaluate(script).status_code == 408
    assert cpu_goes_idle(runaway_server), busy_processes(runaway_server)
    wait_for_workers(runaway_server)


def test_info_stays_fast_while_every_worker_runs_away(runaway_server: Server) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        runaways = [pool.submit(runaway_server.evaluate, "while True: pass") for _ in range(2)]
        time.sleep(0.3)  # both workers are now spinning
        latencies = []
        for _ in range(5):
            started = time.perf_counter()
            response = runaway_server.get("/info")
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200
        assert [f.result().status_code for f in runaways] == [408, 408]
    assert max(latencies) < 0.1, latencies
    wait_for_workers(runaway_server)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("import os\nos._exit(3)", "exited with code 3"),
        ("import ctypes\nctypes.string_at(0)", "was killed by SIGSEGV"),
    ],
)
def test_worker_crash_is_a_5xx_and_the_next_request_succeeds(
    crash_server: Server, script: str, reason: str
) -> None:
    # The previous case's replacement may still be starting; with both workers gone at once
    # the follow-up would wait for a replacement.
    wait_for_workers(crash_server)
    response = crash_server.evaluate(script)
    assert 500 <= response.status_code < 600
    body = response.json()
    assert body["message"] == "Error processing script"
    assert reason in body["info"]
    follow_up = crash_server.evaluate("return _arg1 + 1", _arg1=1)
    assert follow_up.status_code == 200
    assert follow_up.json() == 2


def test_memory_cap_is_a_5xx_and_the_next_request_succeeds(server_factory: ServerFactory) -> None:
    server = server_factory(TABSERVE_WORKER_MEMORY_MB="1024", TABSERVE_WORKERS="1")
    response = server.evaluate("x = bytearray(2 * 1024 ** 3)\nreturn len(x)")
    assert response.status_code == 500
    assert "MemoryError" in response.json()["info"]
    assert "1024 MiB" in response.json()["info"]
    assert server.evaluate("return 7").json() == 7


def test_two_sleeps_run_in_parallel(crash_server: Server) -> None:
    # crash_server's 30 s timeout: runaway_server's 1 s left a sleep of 0.8 s little margin.
    wait_for_workers(crash_server)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        scripts = ["import time\ntime.sleep(0.8)"] * 2
        results = list(pool.map(crash_server.evaluate, scripts))
    elapsed = time.perf_counter() - started
    assert [r.status_code for r in results] == [200, 200]
    assert elapsed < 1.5, elapsed


def test_full_queue_is_503_with_retry_after(server_factory: ServerFactory) -> None:
    server = server_factory(
        TABSERVE_WORKERS="1", TABSERVE_QUEUE_LENGTH="1", TABPY_EVALUATE_TIMEOUT="5"
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(server.evaluate, "import time\ntime.sleep(1.5)")
        time.sleep(0.3)
        waiting = pool.submit(server.evaluate, "return 'waited'")
        time.sleep(0.3)
        rejected = server.evaluate("return 1")
        assert rejected.status_code == 503
        assert rejected.headers["Retry-After"] == "1"
        assert set(rejected.json()) == {"message", "info"}
        assert running.result().status_code == 200
        assert waiting.result().json() == "waited"


def test_scripts_see_a_scrubbed_environment(server_factory: ServerFactory) -> None:
    server = server_factory(
        env={"TABSERVE_TEST_SECRET": "hunter2", "LANG": "C.UTF-8"}, TABSERVE_WORKERS="1"
    )
    env = server.evaluate("import os\nreturn dict(os.environ)").json()
    assert "TABSERVE_TEST_SECRET" not in env
    assert env.get("LANG") == "C.UTF-8"
    assert not set(env) - {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
                           "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                           "NUMEXPR_NUM_THREADS", "PYTHONUNBUFFERED"}  # fmt: skip


def test_print_in_a_script_does_not_corrupt_the_answer(server: Server) -> None:
    response = server.evaluate("print('hello from a script')\nreturn 5")
    assert response.json() == 5
    assert requests.get(server.url + "/info", timeout=5).status_code == 200


def test_an_idle_worker_holds_nothing_of_its_last_large_call(
    server_factory: ServerFactory,
) -> None:
    """A worker frees a call's request, result and answer once it has answered, not when the
    next job replaces them: here 30 MB of body, 30 MB parsed and 30 MB of answer."""
    server = server_factory(TABSERVE_WORKERS="1")
    root = psutil.Process(server.process.pid)

    def descendants_rss() -> int:  # the worker (and the zygote, which does not change)
        return sum(p.memory_info().rss for p in root.children(recursive=True))

    assert server.evaluate("return len(_arg1[0])", _arg1=["warm up"]).text == "7"
    before = descendants_rss()
    text = "ab" * 15_000_000
    body = json.dumps({"script": "return _arg1[0]", "data": {"_arg1": [text]}})
    answer = requests.post(f"{server.url}/evaluate", data=body, timeout=60)
    assert answer.status_code == 200 and len(answer.content) == len(text) + 2
    time.sleep(0.5)  # the reply reaches us before the worker has freed what it built
    grown = descendants_rss() - before
    assert grown < 25_000_000, f"the idle worker still holds {grown / 1e6:.0f} MB"
