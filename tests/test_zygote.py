"""Workers forked from the zygote, and the launchers seen through the executor.

The zygote is started before any secret is read and holds none; it forks workers that keep
every confinement a fresh worker has; a timeout kill takes everything the script started,
children in a session of their own included; and a dead zygote is replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from helpers import Server, ServerFactory, _is_zygote
from tabserve import fdpass
from tabserve.protocol import JobKind
from tabserve.server.executor import Executor, PoolConfig
from tabserve.server.launcher import PACKAGE_PARENT, InMemoryLauncher, interpreter_argv
from tabserve.store.passwords import hash_password
from tabserve.worker.main import Worker

CANARY = f"canary-{uuid.uuid4().hex}"
USER = ("alice", f"pw-{uuid.uuid4().hex}")
PASSWORD_HASH = hash_password(*USER)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secrets")
    path = directory / "passwd.txt"
    path.write_text(f"{USER[0]} {PASSWORD_HASH}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def zygote_server(server_factory: ServerFactory, secret_file: Path) -> Server:
    return server_factory(
        env={"TABSERVE_TEST_CANARY": CANARY},
        auth=USER,
        TABPY_PWD_FILE=str(secret_file),
        TABSERVE_WORKER_LAUNCH="zygote",
        TABPY_EVALUATE_TIMEOUT="3",
        TABSERVE_WORKERS="2",
    )


def wait_for(condition: Any, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def readable_memory(pid: int) -> bytes:
    """Every readable private or anonymous mapping of ``pid`` (we are its ancestor)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


def test_workers_come_from_the_zygote(zygote_server: Server) -> None:
    zygote = zygote_server.zygote_pid()
    assert zygote is not None
    workers = zygote_server.worker_pids()
    assert len(workers) == 2
    assert {psutil.Process(pid).ppid() for pid in workers} == {zygote}
    response = zygote_server.evaluate("import os; return [os.getppid()]")
    assert response.json() == [zygote]


def test_the_zygote_holds_no_secrets(zygote_server: Server, secret_file: Path) -> None:
    # Authenticated calls first: the server now holds the password file and the password.
    assert zygote_server.evaluate("return 1").status_code == 200
    zygote = zygote_server.zygote_pid()
    assert zygote is not None
    environ = Path(f"/proc/{zygote}/environ").read_bytes()
    assert CANARY.encode() not in environ
    assert CANARY.encode() in Path(f"/proc/{zygote_server.process.pid}/environ").read_bytes()
    descriptors = [
        os.readlink(f"/proc/{zygote}/fd/{fd}") for fd in os.listdir(f"/proc/{zygote}/fd")
    ]
    assert str(secret_file) not in descriptors
    assert not any(str(secret_file.parent) in target for target in descriptors), descriptors
    memory = readable_memory(zygote)
    assert len(memory) > 10_000_000  # numpy and pandas really are in there
    for secret in (CANARY, PASSWORD_HASH, USER[1]):
        assert secret.encode() not in memory, secret
    # The same scan finds the password file's hash in the server itself.
    assert PASSWORD_HASH.encode() in readable_memory(zygote_server.process.pid)


def test_the_zygote_starts_before_the_password_file_is_read(zygote_server: Server) -> None:
    log = zygote_server.log()
    ready = log.index("worker zygote")
    users = log.index("Authentication on: 1 user(s)")
    assert ready < users, log


def test_workers_keep_the_environment_allow_list(zygote_server: Server) -> None:
    seen = zygote_server.evaluate("import os; return [repr(dict(os.environ))]").json()[0]
    assert CANARY not in seen
    assert "OPENBLAS_NUM_THREADS" in seen


def test_forked_workers_draw_different_random_numbers(zygote_server: Server) -> None:
    script = "import numpy, os; return [os.getpid(), float(numpy.random.rand())]"
    draws: dict[int, float] = {}
    for _ in range(20):
        pid, value = zygote_server.evaluate(script).json()
        draws[pid] = value
        if len(draws) == 2:
            break
    assert len(draws) == 2
    assert len(set(draws.values())) == 2, draws


def _orphans(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


SPAWN = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", {marker!r}],
                 start_new_session={setsid})
time.sleep(60)
"""


@pytest.mark.parametrize("setsid", [True, False])
def test_a_timeout_kill_takes_the_scripts_children_setsid_included(
    zygote_server: Server, setsid: bool
) -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(zygote_server.evaluate, SPAWN.format(marker=marker, setsid=setsid))
        assert wait_for(lambda: _orphans(marker), 10), "the script's child should be running"
        child = psutil.Process(_orphans(marker)[0])
        if setsid:
            assert os.getsid(child.pid) == child.pid  # it really left the worker's session
        assert future.result().status_code == 408
    assert wait_for(lambda: not _orphans(marker), 10)


def test_children_a_crashed_worker_left_behind_are_killed(zygote_server: Server) -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    script = SPAWN.format(marker=marker, setsid=True).replace(
        "time.sleep(60)", "time.sleep(0.5); import os; os._exit(9)"
    )
    response = zygote_server.evaluate(script)
    assert response.status_code == 500
    assert "exited with code 9" in response.json()["info"]
    assert wait_for(lambda: not _orphans(marker), 10)


def test_a_segfault_leaves_the_server_answering(zygote_server: Server) -> None:
    response = zygote_server.evaluate("import ctypes\nctypes.string_at(0)")
    assert response.status_code == 500
    assert "SIGSEGV" in response.json()["info"]
    for _ in range(4):
        assert zygote_server.evaluate("return [_arg1 + 1]", _arg1=1).json() == [2]
    assert zygote_server.get("/info").status_code == 200


def test_a_killed_zygote_is_replaced_and_the_pool_heals(zygote_server: Server) -> None:
    before = zygote_server.zygote_pid()
    workers = zygote_server.worker_pids()
    assert before is not None
    os.kill(before, signal.SIGKILL)
    # Its workers die with it (they asked for SIGKILL on their parent's death) ...
    assert wait_for(lambda: not workers & zygote_server.worker_pids())
    # ... and a new zygote forks new ones.
    assert wait_for(lambda: zygote_server.zygote_pid() not in (None, before))
    assert wait_for(lambda: len(zygote_server.worker_pids()) == 2)
    assert wait_for(lambda: zygote_server.get("/health/ready").status_code == 200)
    assert zygote_server.evaluate("return 7").json() == 7


def test_the_zygote_obeys_only_the_process_that_started_it(tmp_path: Path) -> None:
    """The control socket pair must have been made by its parent: a zygote handed a socket
    by anyone else (here: made by the grandparent, through a shell) refuses to run."""
    ours, theirs = fdpass.socket_pair()
    config = {"request_limit": 1 << 20, "control": theirs.fileno()}
    argv = interpreter_argv("zygote", config)
    command = " ".join(f"'{part}'" for part in argv) + "; exit $?"
    done = subprocess.run(
        ["sh", "-c", command], pass_fds=(theirs.fileno(),), capture_output=True, timeout=60
    )
    theirs.close()
    assert done.returncode == 2, done.stderr
    assert b"not made by this process's parent" in done.stderr
    ours.setblocking(False)
    assert ours.recv(64) == b""  # it never said it was ready, and it is gone
    ours.close()
    assert PACKAGE_PARENT in argv


@pytest.mark.parametrize("launch", ["fresh", "zygote"])
def test_limits_hold_in_each_launch_mode(server_factory: ServerFactory, launch: str) -> None:
    server = server_factory(
        TABSERVE_WORKER_LAUNCH=launch,
        TABSERVE_WORKERS="1",
        TABSERVE_WORKER_MEMORY_MB="512",
        TABSERVE_WORKER_OPEN_FILES="64",
        TABSERVE_WORKER_FILE_SIZE_MB="1",
    )
    script = """
import os, resource
return [resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        resource.getrlimit(resource.RLIMIT_FSIZE)[0], os.getsid(0) == os.getpid(), os.nice(0)]
"""
    address, files, size, leader, nice = server.evaluate(script).json()
    assert (address, files, size) == (512 * 1024 * 1024, 64, 1024 * 1024)
    assert leader  # its own session and process group
    # Workers run 5 steps nicer than the server, whatever the server's own niceness (a
    # test run under `nice` starts it at more than 0; the cap is 19).
    assert nice == min(os.nice(0) + 5, 19)
    big = server.evaluate("return [len(bytearray(1024 * 1024 * 1024))]")
    assert big.status_code == 500 and "MemoryError" in big.json()["info"]
    assert server.evaluate("return 3").json() == 3


# -- the in-memory launcher: the executor's bookkeeping without processes ----------------------


def test_the_executor_runs_on_the_in_memory_launcher() -> None:
    worker = Worker({"request_limit": 1 << 20})

    def handle(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        if header["kind"] == JobKind.CONTEXT:
            worker.set_context(orjson.loads(payload))
            return {}, b""
        return worker.handle(header, payload)  # type: ignore[arg-type,return-value]

    async def main() -> None:
        launcher = InMemoryLauncher(handle)
        config = PoolConfig(workers=2, request_limit=1 << 20)
        executor = Executor(config, launcher=launcher)
        await executor.start()
        try:
            body = orjson.dumps({"script": "return [x + 1 for x in _arg1]", "data": {"_arg1": [1]}})
            result = await executor.run(JobKind.EVALUATE, body, 5)
            assert result.body == b"[2]"
            assert result.meta["worker_pid"] < 0  # a thread, not a process
            entry = {"model": "m", "version": 1, "path": "/nowhere/m", "python_version": None}
            executor.set_context({"endpoints": {"m": entry}})  # type: ignore[typeddict-item]
            with pytest.raises(Exception) as caught:
                await executor.run(JobKind.QUERY, b'{"data": []}', 5, {"name": "m"})
            assert "LoadFailed" in str(caught.value.info)  # type: ignore[attr-defined]
            assert "m" in worker.endpoints  # the context frame went first
            # A fake that ends is replaced like a dead worker.
            victim = executor._idle[0]
            victim.kill()
            for _ in range(100):
                if launcher.launched == 3 and executor.alive == 2:
                    break
                await asyncio.sleep(0.02)
            assert (launcher.launched, executor.alive) == (3, 2)
        finally:
            await executor.close()

    asyncio.run(main())


@pytest.mark.root
def test_forked_workers_switch_to_the_worker_user() -> None:
    """The zygote runs as the server's user (root); each worker it forks gives that up before
    it says it is ready, as a fresh worker does (worker.main.confine)."""

    async def main() -> None:
        config = PoolConfig(
            workers=1, request_limit=1 << 20, launch="zygote", drop_to=(65534, 65534)
        )
        executor = Executor(config)
        await executor.start()
        try:
            script = "import os; return [os.getuid(), os.getgid(), os.getgroups()]"
            body = orjson.dumps({"script": script, "data": {}})
            result = await executor.run(JobKind.EVALUATE, body, 10)
            assert orjson.loads(result.body) == [65534, 65534, []]
        finally:
            await executor.close()

    assert os.geteuid() == 0, "run as root (the root marker)"
    asyncio.run(main())


@pytest.mark.root
def test_a_busy_worker_that_gave_up_root_still_dies_with_its_zygote() -> None:
    """setuid clears the parent-death signal (prctl(2)): a worker that switched user must
    ask for it again, or a killed zygote would leave a runaway script running. (An idle
    worker would exit anyway: the server closes its channel.)"""

    async def main() -> None:
        config = PoolConfig(
            workers=1, request_limit=1 << 20, launch="zygote", drop_to=(65534, 65534)
        )
        executor = Executor(config)
        await executor.start()
        try:
            zygote = next(p for p in psutil.Process().children() if _is_zygote(p))
            (worker,) = zygote.children()
            body = orjson.dumps({"script": "while True: pass", "data": {}})
            runaway = asyncio.create_task(executor.run(JobKind.EVALUATE, body, 60))
            await asyncio.sleep(0.5)
            assert worker.uids().real == 65534 and worker.status() == psutil.STATUS_RUNNING
            zygote.kill()
            await asyncio.to_thread(worker.wait, 10)  # psutil.TimeoutExpired if it lives on
            runaway.cancel()
        finally:
            await executor.close()

    assert os.geteuid() == 0, "run as root (the root marker)"
    asyncio.run(main())


def test_a_zygote_that_cannot_preload_stops_the_start() -> None:
    async def main() -> None:
        config = PoolConfig(
            workers=1, request_limit=1 << 20, launch="zygote", preload=("no_such_module_xyz",)
        )
        executor = Executor(config)
        with pytest.raises(RuntimeError, match="no_such_module_xyz"):
            await executor.start()
        await executor.close()

    asyncio.run(main())


def test_preloaded_modules_are_imported_before_the_first_job() -> None:
    async def main(launch: str) -> None:
        config = PoolConfig(workers=1, request_limit=1 << 20, launch=launch, preload=("colorsys",))
        executor = Executor(config)
        await executor.start()
        try:
            body = orjson.dumps(
                {"script": "import sys; return ['colorsys' in sys.modules]", "data": {}}
            )
            assert (await executor.run(JobKind.EVALUATE, body, 10)).body == b"[true]"
        finally:
            await executor.close()

    for launch in ("fresh", "zygote"):
        asyncio.run(main(launch))


def test_a_preloaded_module_that_starts_a_thread_stops_the_start(tmp_path: Path) -> None:
    # A fork keeps only the forking thread; another thread's held locks would hang workers.
    (tmp_path / "starts_a_thread.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), name='poller', daemon=True).start()\n"
    )

    async def main() -> None:
        config = PoolConfig(
            workers=1,
            request_limit=1 << 20,
            launch="zygote",
            preload=("starts_a_thread",),
            env_allow=("PYTHONPATH",),
        )
        executor = Executor(config, environ={"PYTHONPATH": str(tmp_path)})
        with pytest.raises(RuntimeError, match=r"1 other thread\(s\) \(poller\)"):
            await executor.start()
        await executor.close()

    asyncio.run(main())
