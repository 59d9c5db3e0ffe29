"""How workers start: fresh interpreters against forks of the zygote.

    python -m bench.launch [--workers 2] [--rounds 10] [--json out.json]

Measures, for each launch mode (and for the zygote with and without ``gc.freeze``):

- **spawn**: from asking the launcher for a worker to the worker's greeting (the executor's
  view of starting one), median and worst of ``--rounds``;
- **next call after a timeout kill**: a real server with one worker, a script that runs
  past ``TABPY_EVALUATE_TIMEOUT``, then the time of the next ``return 1`` (it waits for the
  replacement): the issue's target is 50 ms;
- **idle PSS of the whole process tree** (front end, zygote, workers; proportional set
  size, so pages shared between processes are counted once in total), after each worker
  ran one pandas job, as ``/proc/<pid>/smaps_rollup`` reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import requests

from tabserve.protocol import JobKind
from tabserve.server.executor import Executor, PoolConfig, WorkerProcess

PANDAS_JOB = (
    "import pandas as pd\n"
    "frame = pd.DataFrame({'a': _arg1, 'b': _arg2})\n"
    "return (frame.a * frame.b).tolist()"
)


async def _spawn_times(launch: str, rounds: int, gc_freeze: bool) -> list[float]:
    config = PoolConfig(workers=1, request_limit=1 << 20, launch=launch, gc_freeze=gc_freeze)
    executor = Executor(config)
    await executor.start()
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            worker = await WorkerProcess.spawn(executor.launcher, 60)
            times.append((time.perf_counter() - started) * 1000)
            await worker.stop()
    finally:
        await executor.close()
    return times


_RAW_FORK = """
import gc, os, statistics, sys, time
import numpy, pandas
import tabserve.worker.main
gc.collect(); gc.freeze()
times = []
for _ in range(int(sys.argv[1])):
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    times.append((time.perf_counter() - started) * 1000)
    os.waitpid(pid, 0)
print(statistics.median(times), max(times))
"""


def _raw_fork_ms(rounds: int) -> list[float]:
    """``os.fork()`` alone in a process that imported what the zygote imports."""
    done = subprocess.run(
        [sys.executable, "-c", _RAW_FORK, str(rounds)], capture_output=True, text=True, check=True
    )
    return [round(float(x), 2) for x in done.stdout.split()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    def __init__(self, root: Path, workers: int, **config: str) -> None:
        self.port = _free_port()
        lines = [
            "[TabPy]",
            f"TABPY_PORT = {self.port}",
            f"TABPY_STATE_PATH = {root / 'state'}",
            f"TABSERVE_WORKERS = {workers}",
            "TABSERVE_WORKER_USER = root",
            *(f"{key} = {value}" for key, value in config.items()),
        ]
        conf = root / "tabserve.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.log = (root / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tabserve", "--config", str(conf)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/info", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def evaluate(self, script: str, **data: Any) -> requests.Response:
        return requests.post(
            self.url + "/evaluate", json={"script": script, "data": data}, timeout=60
        )

    def tree_pss(self) -> tuple[float, int]:
        root = psutil.Process(self.process.pid)
        total = 0
        processes = [root, *root.children(recursive=True)]
        for process in processes:
            total += process.memory_full_info().pss
        return total / 1e6, len(processes)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _next_call_after_kill(launch: str, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = _Server(Path(tmp), 1, TABSERVE_WORKER_LAUNCH=launch, TABPY_EVALUATE_TIMEOUT="4")
        try:
            times = []
            for _ in range(rounds):
                assert server.evaluate("import time; time.sleep(60)").status_code == 408
                started = time.perf_counter()
                answer = server.evaluate("return 1")
                assert answer.status_code == 200, (launch, answer.status_code, answer.text)
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(0.2)
            return times
        finally:
            server.stop()


def _idle_pss(launch: str, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        server = _Server(Path(tmp), workers, TABSERVE_WORKER_LAUNCH=launch)
        try:
            data = list(range(1000))
            for _ in range(workers * 4):  # every worker did some pandas work
                assert server.evaluate(PANDAS_JOB, _arg1=data, _arg2=data).status_code == 200
            time.sleep(1)
            return server.tree_pss()
        finally:
            server.stop()


async def _pool_pss(workers: int, gc_freeze: bool) -> float:
    """PSS of the zygote and its workers alone (no front end), after pandas work."""
    config = PoolConfig(
        workers=workers, request_limit=1 << 20, launch="zygote", gc_freeze=gc_freeze
    )
    executor = Executor(config)
    await executor.start()
    try:
        data = list(range(1000))
        body = orjson.dumps({"script": PANDAS_JOB, "data": {"_arg1": data, "_arg2": data}})
        for _ in range(workers * 4):
            await executor.run(JobKind.EVALUATE, body, 30)
        # Let every worker collect garbage a few times, as a long-lived one would.
        collect = orjson.dumps({"script": "import gc; gc.collect(); return 1", "data": {}})
        for _ in range(workers * 4):
            await executor.run(JobKind.EVALUATE, collect, 30)
        await asyncio.sleep(0.5)
        zygote = executor.launcher.pid  # type: ignore[attr-defined]
        pids = [zygote, *executor.pids]
        return sum(psutil.Process(pid).memory_full_info().pss for pid in pids) / 1e6
    finally:
        await executor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load average at start": os.getloadavg()[0],
        "workers": args.workers,
        "fork() ms of a preloaded process": _raw_fork_ms(args.rounds),
    }
    for launch, freeze in (("fresh", True), ("zygote", True), ("zygote", False)):
        key = launch if launch == "fresh" or freeze else "zygote (no gc.freeze)"
        times = asyncio.run(_spawn_times(launch, args.rounds, freeze))
        results[f"spawn ms, {key}"] = [round(statistics.median(times), 1), round(max(times), 1)]
    for freeze in (True, False):
        pss = asyncio.run(_pool_pss(args.workers, freeze))
        results[f"zygote+workers PSS MB, gc.freeze {'on' if freeze else 'off'}"] = round(pss, 1)
    for launch in ("fresh", "zygote"):
        times = _next_call_after_kill(launch, 3)
        results[f"next call after kill ms, {launch}"] = [
            round(statistics.median(times), 1),
            round(max(times), 1),
        ]
        pss, count = _idle_pss(launch, args.workers)
        results[f"idle tree PSS MB, {launch}"] = [round(pss, 1), count]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
