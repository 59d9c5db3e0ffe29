"""TABSERVE_PROCESSES = 2: two front-end processes, one master, one worker pool, for real.

Which front end answers a connection is the kernel's choice; a keep-alive session stays on
the one that accepted it, and /health/ready's ``process`` check names that process, so each
test holds one session per front end and knows which one it is talking to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import orjson
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import USER1_HASH, Server, ServerFactory, write
from tabserve import fdpass
from tabserve.errors import WorkerDied
from tabserve.protocol import JobKind
from tabserve.server.executor import Executor, PoolConfig, WorkerProcess, job_header
from tabserve.server.frontends import (
    FrontEndFailed,
    LeasedPool,
    Master,
    MasterLink,
    _Leased,
    context_digest,
    job_slots,
)
from tabserve.server.launcher import InMemoryLauncher
from tabserve.worker.main import Worker

_PROCESS = re.compile(r"pid (\d+)")


def frontend_pid(session: requests.Session, server: Server) -> int:
    response = session.get(server.url + "/health/ready", timeout=30)
    for check in response.json()["checks"]:
        if check["name"] == "process":
            match = _PROCESS.search(check["detail"])
            assert match, check
            return int(match.group(1))
    raise AssertionError(f"no process check: {response.text}")


def sessions(server: Server, auth: tuple[str, str] | None = None) -> dict[int, requests.Session]:
    """One keep-alive session connected to each of the two front ends, by pid."""
    found: dict[int, requests.Session] = {}
    # The port answers as soon as the first front end is up; the second may still be starting.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        session = requests.Session()
        session.auth = auth
        pid = frontend_pid(session, server)
        if pid in found:
            session.close()
        else:
            found[pid] = session
        if len(found) == 2:
            return found
        time.sleep(0.02)
    raise AssertionError(f"only front ends {sorted(found)} ever answered")


def evaluate(
    session: requests.Session, server: Server, script: str, timeout: float = 60
) -> requests.Response:
    return session.post(
        server.url + "/evaluate", json={"script": script, "data": {}}, timeout=timeout
    )


@pytest.fixture(scope="module")
def two(server_factory: ServerFactory) -> Server:
    return server_factory(
        TABSERVE_PROCESSES="2",
        TABPY_EVALUATE_TIMEOUT="4",
        TABSERVE_WORKERS="2",
        TABSERVE_WORKER_MEMORY_MB="512",
    )


def test_both_front_ends_answer_and_the_master_serves_none(two: Server) -> None:
    found = sessions(two)
    children = {child.pid for child in psutil.Process(two.process.pid).children()}
    # Both are the master's own children; the master itself never answers.
    assert set(found) <= children
    assert two.process.pid not in found
    for session in found.values():
        assert evaluate(session, two, "return [1]").json() == [1]


@pytest.mark.slow
def test_a_runaway_script_is_killed_and_the_others_go_on(two: Server) -> None:
    found = sessions(two)
    runaway_on, other = list(found.values())
    kills = two.metric("tabserve_worker_kills_total")
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        runaway = pool.submit(evaluate, runaway_on, two, "while True:\n    pass")
        time.sleep(0.5)
        # Meanwhile the other worker serves both front ends.
        for session in (other, requests.Session()):
            assert evaluate(session, two, "return [2]").json() == [2]
        response = runaway.result(timeout=60)
    assert response.status_code == 408, response.text
    assert time.monotonic() - started < 30
    for session in found.values():
        assert evaluate(session, two, "return [3]").json() == [3]
    deadline = time.monotonic() + 10
    while two.metric("tabserve_worker_kills_total") < kills + 1:
        assert time.monotonic() < deadline, "the master never counted the kill"
        time.sleep(0.1)


def test_a_segfault_leaves_both_front_ends_answering(two: Server) -> None:
    for session in sessions(two).values():
        response = evaluate(session, two, "import ctypes\nctypes.string_at(0)")
        assert response.status_code == 500, response.text
        assert "SIGSEGV" in response.json()["info"]
        assert evaluate(session, two, "return [4]").json() == [4]


def test_a_worker_that_asks_to_be_recycled_is_replaced_not_counted_as_a_crash(
    two: Server,
) -> None:
    # The pool's counters reach the front ends every half second (frontends._POOL_EVERY):
    # the segfaults of the test before may still be on their way, and a crash wrongly
    # counted here would arrive after the last call.
    crashes = _settled(two, "tabserve_worker_crashes_total")
    for session in sessions(two).values():
        # Out of memory: the worker answers, then asks to be replaced (a fragmented heap).
        big = evaluate(session, two, "return [len(bytearray(1024 * 1024 * 1024))]")
        assert big.status_code == 500 and "MemoryError" in big.json()["info"]
        assert evaluate(session, two, "return [6]").json() == [6]
    assert _settled(two, "tabserve_worker_crashes_total") == crashes


def _settled(server: Server, name: str) -> float:
    """A pool metric once two reads a push interval and more apart agree."""
    value = server.metric(name)
    while True:
        time.sleep(1.2)
        again = server.metric(name)
        if again == value:
            return value
        value = again


def _archive(offset: int) -> str:
    def shifted(x: list[float], y: list[float]) -> list[float]:
        return [a + b + offset for a, b in zip(x, y, strict=True)]

    return base64.b64encode(cloudpickle.dumps(shifted)).decode("ascii")


def test_a_deploy_through_one_front_end_is_answered_by_the_other_at_once(two: Server) -> None:
    (first, one), (second, other) = sessions(two).items()
    for round_, (via, then) in enumerate([(one, other), (other, one)]):
        body = {
            "name": "shift", "type": "model", "archive": _archive(round_),
            "python_version": platform.python_version(),
        }  # fmt: skip
        if round_ == 0:
            deployed = via.post(two.url + "/endpoints", json=body, timeout=60)
        else:
            body["should_update_version"] = True
            deployed = via.put(two.url + "/endpoints/shift", json=body, timeout=60)
        assert deployed.status_code in (200, 201), deployed.text
        # The very next call, on the other process, sees it (no wait, no retry).
        answer = then.post(
            two.url + "/query/shift", json={"data": {"x": [1], "y": [2]}}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] == [3 + round_]
    removed = other.delete(two.url + "/endpoints/shift", timeout=30)
    assert removed.status_code == 204
    gone = one.post(two.url + "/query/shift", json={"data": {"x": [1], "y": [2]}}, timeout=30)
    assert gone.status_code == 404
    assert first != second


def _requests_total(text: str, route: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tabserve_requests_total" and sample.labels.get("route") == route:
                total += sample.value
    return total


def test_counters_in_metrics_add_up_across_processes(two: Server) -> None:
    found = list(sessions(two).values())
    before = _requests_total(found[0].get(two.url + "/metrics").text, "/info")
    for i in range(10):
        assert found[i % 2].get(two.url + "/info").status_code == 200
    # Whichever process is scraped, it reports what both answered.
    for session in found:
        text = session.get(two.url + "/metrics").text
        assert _requests_total(text, "/info") == before + 10
        # The pool's state, from the master (a worker killed by an earlier test may still
        # be being replaced).
        assert re.search(r"^tabserve_workers [12]\.0$", text, re.MULTILINE), text


@pytest.mark.slow
def test_sigterm_drains_both_front_ends(server_factory: ServerFactory) -> None:
    server = server_factory(
        TABSERVE_PROCESSES="2",
        TABSERVE_WORKERS="2",
        TABPY_EVALUATE_TIMEOUT="30",
        TABSERVE_SHUTDOWN_GRACE="20",
    )
    found = sessions(server)
    everyone = {child.pid for child in psutil.Process(server.process.pid).children(True)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [
            pool.submit(evaluate, session, server, "import time\ntime.sleep(3)\nreturn [5]")
            for session in found.values()
        ]
        deadline = time.monotonic() + 20
        while server.metric("tabserve_workers_busy") < 2:
            assert time.monotonic() < deadline, "the slow requests never reached the workers"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        responses = [future.result(timeout=60) for future in slow]
    assert [r.json() for r in responses] == [[5], [5]]
    try:
        assert server.process.wait(timeout=40) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"tabserve did not exit:\n{server.log()}")
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) for pid in everyone):
        assert time.monotonic() < deadline, "a front end or worker outlived the master"
        time.sleep(0.05)
    assert server.log().count("requests in flight") >= 2  # each front end drained its own


def test_the_failure_throttle_is_shared(server_factory: ServerFactory, tmp_path: Path) -> None:
    passwords = write(tmp_path / "passwords.txt", f"user1 {USER1_HASH}\n")
    server = server_factory(
        TABSERVE_PROCESSES="2", TABPY_PWD_FILE=str(passwords), TABSERVE_WORKERS="1"
    )
    found = list(sessions(server, auth=("user1", "P@ssw0rd")).values())
    for session in found:
        session.auth = ("user1", "wrong")
    # Four failures through one front end, the fifth through the other: the fifth reaches
    # the threshold there (and is slowed down, and logged so) only if it counted the four.
    for _ in range(4):
        assert found[0].get(server.url + "/endpoints", timeout=30).status_code == 401
    assert "Slowing down" not in server.log()
    time.sleep(1.0)  # the master relays each failure as it happens; this is a wide margin
    assert found[1].get(server.url + "/endpoints", timeout=30).status_code == 401
    assert "Slowing down 127.0.0.1: 5 failed logins" in server.log()


def test_each_front_end_follows_the_password_file_and_sighup_reaches_them(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    passwords = write(tmp_path / "passwords.txt", f"user1 {USER1_HASH}\n")
    server = server_factory(
        TABSERVE_PROCESSES="2", TABPY_PWD_FILE=str(passwords), TABSERVE_WORKERS="1"
    )
    found = list(sessions(server, auth=("user1", "P@ssw0rd")).values())
    for session in found:
        assert session.get(server.url + "/endpoints", timeout=30).status_code == 200
    # user1 renamed in place, with the same size and modification time: no front end sees a
    # change by itself; only SIGHUP (to the master, forwarded) makes each re-read it.
    before = passwords.stat()
    with passwords.open("r+b") as handle:
        handle.write(b"user2")
    os.utime(passwords, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)
    for session in found:
        assert session.get(server.url + "/endpoints", timeout=30).status_code == 200
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    for session in found:
        while session.get(server.url + "/endpoints", timeout=30).status_code != 401:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    assert server.process.poll() is None  # SIGHUP does not stop the master


def _workers(server: Server) -> set[int]:
    """The pool's workers: the zygote's children (the front ends are the master's)."""
    zygote = server.zygote_pid()
    assert zygote is not None
    return {child.pid for child in psutil.Process(zygote).children()}


@pytest.mark.slow
def test_a_front_end_that_dies_is_replaced_and_its_leased_worker_retired(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        TABSERVE_PROCESSES="2", TABSERVE_WORKERS="2", TABPY_EVALUATE_TIMEOUT="60"
    )
    found = sessions(server)
    doomed, survivor = list(found)
    before = _workers(server)
    assert len(before) == 2
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(evaluate, found[doomed], server, "import time\ntime.sleep(50)\nreturn [1]")
        deadline = time.monotonic() + 20
        while server.metric("tabserve_workers_busy") < 1:
            assert time.monotonic() < deadline, "the slow request never reached a worker"
            time.sleep(0.05)
        psutil.Process(doomed).kill()
        # The worker it had leased runs a job for nobody: the master kills and replaces it.
        deadline = time.monotonic() + 20
        while len(before - _workers(server)) != 1 or len(_workers(server)) != 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert evaluate(found[survivor], server, "return [7]").json() == [7]
        # And a new front end takes the dead one's place.
        replaced = sessions(server)
        assert doomed not in replaced and survivor in replaced
        assert server.process.poll() is None


def test_jobs_never_take_the_last_worker_from_requests(two: Server) -> None:
    # Two workers, two front ends: one job at a time in all (workers - 1), not one each.
    ids = []
    for session in sessions(two).values():
        answer = session.post(
            two.url + "/evaluate",
            json={"script": "import time\ntime.sleep(3)\nreturn [8]", "data": {}},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["job"]["id"])

    def statuses() -> list[int]:
        return [two.get(f"/jobs/{job_id}").json()["job"]["status"] for job_id in ids]

    deadline = time.monotonic() + 30
    while 2 not in statuses():
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    time.sleep(1.5)  # more than the claim loop's poll interval
    assert sorted(statuses())[:2] != [2, 2]  # never both running
    assert two.evaluate("return [9]").json() == [9]  # the other worker serves requests
    deadline = time.monotonic() + 60
    while statuses() != [3, 3]:
        assert time.monotonic() < deadline, statuses()
        time.sleep(0.1)


# -- the lease bookkeeping, in this process (workers are threads: InMemoryLauncher) -----------


def _in_memory_worker() -> InMemoryLauncher:
    worker = Worker({"request_limit": 1 << 20})

    def handle(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        if header["kind"] == JobKind.CONTEXT:
            worker.set_context(orjson.loads(payload))
            return {}, b""
        return worker.handle(header, payload)  # type: ignore[arg-type,return-value]

    return InMemoryLauncher(handle)


def _duplicate(worker: WorkerProcess) -> WorkerProcess:
    """What a front end holds: duplicates of the worker's sockets, read only while leased."""
    channel, tables = (
        socket.socket(fileno=os.dup(sock.fileno())) for sock in (worker.channel, worker.fd_channel)
    )
    channel.setblocking(False)
    tables.setblocking(False)
    return WorkerProcess(_Leased(worker.pid, channel, tables), reading=False)  # type: ignore[arg-type]


def test_a_leased_worker_is_read_only_by_its_lessee_and_goes_back_to_the_queue() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        executor = Executor(
            PoolConfig(workers=1, request_limit=1 << 20), launcher=_in_memory_worker()
        )
        await executor.start()
        try:
            worker = await executor.lease(5)
            assert executor.busy == 1
            # The master does not read a leased worker's socket (remove_reader: was it on?).
            assert not loop.remove_reader(worker.channel)
            queued = asyncio.ensure_future(executor.lease(5))
            await asyncio.sleep(0.05)
            assert executor.queued == 1 and not queued.done()  # one FIFO for every lessee
            lessee = _duplicate(worker)
            body = orjson.dumps({"script": "return [x + 1 for x in _arg1]", "data": {"_arg1": [1]}})
            # Many round trips: a master still reading the socket would steal some replies.
            for _ in range(50):
                lessee.resume()
                header = job_header(JobKind.EVALUATE, None)
                _, answer, _ = await lessee.call(header, body, loop.time() + 5)
                lessee.pause()
                assert answer == b"[2]"
            executor.give_back(worker)
            assert await asyncio.wait_for(queued, 5) is worker  # handed to the one waiting
            assert not loop.remove_reader(worker.channel)
            executor.give_back(worker)  # nobody waits: idle, and read by the master again
            assert executor.busy == 0 and loop.remove_reader(worker.channel)
            assert await executor.lease(5) is worker
            executor.retire_leased(worker, "timeout")
            assert (executor.stats.timeouts, executor.stats.kills) == (1, 1)
            for _ in range(100):
                if executor.alive == 1 and executor.members != [worker]:
                    break
                await asyncio.sleep(0.02)
            assert executor.alive == 1 and worker not in executor.members  # replaced
            lessee.kill()
        finally:
            await executor.close()

    asyncio.run(main())


def test_job_slots_add_up_to_what_one_process_runs() -> None:
    from tabserve.config import load_settings

    for workers in (1, 2, 3, 8):
        for processes in (1, 2, 3, 4):
            settings = load_settings(
                None, {"TABSERVE_WORKERS": str(workers), "TABSERVE_PROCESSES": str(processes)}
            )
            total = sum(job_slots(settings, index) for index in range(processes))
            assert total == max(1, workers - 1)


def test_a_table_is_named_by_its_bytes() -> None:
    assert context_digest(b'{"endpoints":{}}') == context_digest(b'{"endpoints":{}}')
    assert context_digest(b'{"endpoints":{}}') != context_digest(b'{"endpoints":{"a":1}}')


def _running(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zygote", "fresh", "bubblewrap"])
def test_a_runaway_is_killed_with_its_setsid_child_in_every_launch_mode(
    server_factory: ServerFactory, mode: str
) -> None:
    """A timeout in a front end is a kill by the master, through its launcher: the fresh
    launcher kills the process group, the zygote and bubblewrap everything the script
    started, a child in a session of its own included."""
    settings = {"TABSERVE_WORKER_LAUNCH": "fresh" if mode == "fresh" else "zygote"}
    workdir = None
    if mode == "bubblewrap":
        # bubblewrap gives scripts an empty /tmp: the server's files live elsewhere.
        workdir = Path(tempfile.mkdtemp(prefix="tabserve-frontends-", dir="/var/tmp"))
        workdir.chmod(0o1777)
        settings = {"TABSERVE_SANDBOX": "bubblewrap", "TABSERVE_WORKER_USER": "nobody"}
    server = server_factory(
        workdir=workdir,
        TABSERVE_PROCESSES="2",
        TABSERVE_WORKERS="2",
        TABPY_EVALUATE_TIMEOUT="5",
        **settings,
    )
    marker = f"orphan-{uuid.uuid4().hex}"
    session = mode != "fresh"  # a fresh worker's kill takes its process group only
    script = (
        "import subprocess, sys\n"
        f'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"],'
        f" start_new_session={session})\n"
        "while True:\n    pass"
    )
    found = sessions(server)
    try:
        for front_end in found.values():
            response = evaluate(front_end, server, script)
            assert response.status_code == 408, response.text
            assert evaluate(front_end, server, "return [10]").json() == [10]
        deadline = time.monotonic() + 15
        while _running(marker):
            assert time.monotonic() < deadline, "what the script started outlived it"
            time.sleep(0.1)
    finally:
        for pid in _running(marker):  # leave nothing behind, whatever failed
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if workdir is not None:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)


# -- the lease channel, a front end's end of it ---------------------------------------------


def _leased_pool() -> tuple[LeasedPool, socket.socket]:
    """A front end's pool, and the master's end of its lease channel (blocking, for reads)."""
    master, ours = fdpass.socket_pair()
    master.settimeout(5)
    settings = SimpleNamespace(workers=1, max_request_bytes=1 << 20, queue_length=8)
    return LeasedPool(settings, MasterLink(ours, lambda: None)), master  # type: ignore[arg-type]


def _socket_fds() -> list[int]:
    """Two raw descriptors, as a ``leased`` message brings a worker's sockets."""
    fds = []
    for _ in range(2):
        one, other = socket.socketpair()
        other.close()
        fds.append(one.detach())
    return fds


def test_a_malformed_leased_message_has_its_descriptors_closed_exactly_once() -> None:
    async def main() -> None:
        pool, master = _leased_pool()
        fds = _socket_fds()
        rejected = False
        try:
            try:
                pool._on_leased({"op": "leased", "id": 1, "worker": 1, "pid": "no pid"}, fds)
            except ValueError:
                rejected = True
                fdpass.close_all(fds)  # what MasterLink does with a rejected message's
                # Other files take those numbers while the error (and what its frames hold)
                # is alive; a socket object made from the old descriptors must not close them.
                null = os.open(os.devnull, os.O_RDONLY)
                for fd in fds:
                    if fd != null:
                        os.dup2(null, fd)
                if null not in fds:
                    os.close(null)
            gc.collect()
            assert rejected
            for fd in fds:
                os.fstat(fd)  # EBADF: closed a second time
            assert pool._workers == {}
        finally:
            fdpass.close_all(fds)
            pool.link.close()
            master.close()

    asyncio.run(main())


def test_leased_descriptors_that_are_not_sockets_are_closed_and_the_worker_retired() -> None:
    async def main() -> None:
        pool, master = _leased_pool()
        waiter = asyncio.get_running_loop().create_future()
        pool._waiting[1] = waiter
        read, write = os.pipe()
        try:
            message = {"op": "leased", "id": 1, "worker": 3, "pid": 5, "context": None}
            pool._on_leased(message, [read, write])
            for fd in (read, write):
                with pytest.raises(OSError):
                    os.fstat(fd)
            assert isinstance(waiter.exception(), WorkerDied)
            received = fdpass.receive_message(master)
            assert received == ({"op": "kill", "worker": 3, "reason": "unusable lease"}, [])
        finally:
            pool.link.close()
            master.close()

    asyncio.run(main())


async def _until(condition: Any, within: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_cancelled_acquire_gives_up_its_place_in_the_masters_queue_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        executor = Executor(
            PoolConfig(workers=1, request_limit=1 << 20), launcher=_in_memory_worker()
        )
        await executor.start()
        # A master and one front end in this process, on a lease channel as start() makes it.
        master = Master(SimpleNamespace(processes=1), executor, b"", [], {})  # type: ignore[arg-type]
        frontend = master.frontends[0]
        ours, theirs = fdpass.socket_pair()
        ours.setblocking(False)
        frontend.sock = ours
        loop.add_reader(ours, frontend._readable)
        settings = SimpleNamespace(workers=1, max_request_bytes=1 << 20, queue_length=8)
        pool = LeasedPool(settings, MasterLink(theirs, lambda: None))  # type: ignore[arg-type]
        body = orjson.dumps({"script": "return [x + 1 for x in _arg1]", "data": {"_arg1": [1]}})
        try:
            busy = await executor.lease(5)  # the only worker
            request = asyncio.ensure_future(pool.run(JobKind.EVALUATE, body, 30))
            assert await _until(lambda: executor.queued == 1)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            # Gone from the queue now, not in 30 s.
            assert await _until(lambda: executor.queued == 0), executor.queued
            executor.give_back(busy)
            assert executor.busy == 0  # idle, not leased to a request nobody waits for
            result = await asyncio.wait_for(pool.run(JobKind.EVALUATE, body, 5), 5)
            assert result.body == b"[2]"
            assert await _until(lambda: executor.busy == 0)  # released after its job
        finally:
            frontend._lost()
            pool.lost()
            pool.link.close()
            await executor.close()

    asyncio.run(main())


def test_a_worker_leased_just_as_its_request_was_cancelled_goes_straight_back() -> None:
    async def main() -> None:
        pool, master = _leased_pool()
        loop = asyncio.get_running_loop()
        try:
            waiting = asyncio.ensure_future(pool._lease(5, loop.time() + 5))
            await asyncio.sleep(0)
            acquire, _ = fdpass.receive_message(master)  # type: ignore[misc]
            assert acquire["op"] == "acquire"
            # The answer arrives, and the request is cancelled before it could go on.
            leased = {"op": "leased", "id": acquire["id"], "worker": 7, "pid": 9, "context": "t"}
            pool._on_leased(leased, _socket_fds())
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            assert fdpass.receive_message(master) == (
                {"op": "release", "worker": 7, "context": "t"},
                [],
            )
        finally:
            pool.lost()
            pool.link.close()
            master.close()

    asyncio.run(main())


def test_a_front_end_that_dies_before_reading_its_start_up_data_is_a_failed_start(
    tmp_path: Path,
) -> None:
    # An interpreter that exits before it reads anything: its stdin has no reader left.
    (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    # More than a pipe holds, so the write waits for a reader rather than filling the pipe.
    payload = b"x" * (1 << 20)
    env = {"PYTHONPATH": str(tmp_path)}

    async def main() -> None:
        master = Master(SimpleNamespace(processes=1), None, payload, [], env)  # type: ignore[arg-type]
        frontend = master.frontends[0]
        with pytest.raises(FrontEndFailed, match="exited with code 3 before reading"):
            frontend.start()
        assert frontend.sock is None
        assert frontend.process is not None and frontend.process.returncode == 3  # reaped

    asyncio.run(main())
