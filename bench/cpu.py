"""CPU time per call of each process of a server, under wrk load.

    python -m bench.cpu [--seconds 5] [--connections 8] [--workers 2] [SETTING=VALUE ...]

Starts tabserve (and the bare Tornado ceiling) on free ports, deploys ``add2`` with TabPy's
own client, and for small ``/evaluate``, ``/query/add2`` and ``/info`` prints req/s and the
CPU time (user + system, from ``/proc``) the front end and the workers spent per call.
CPU per call suffers much less from a busy machine than req/s does. Needs wrk.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench import loadgen, servers
from bench import workloads as wl
from bench.servers import Server, ServerOptions


def _cpu(processes: list[psutil.Process]) -> dict[int, float]:
    seconds: dict[int, float] = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def _role(process: psutil.Process, root: int, processes: int) -> str:
    if process.pid == root:
        return "master" if processes > 1 else "front end"
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "workers"
    return "front ends" if "server.frontends" in command else "workers"


def measure(
    server: Server, request: loadgen.Request, seconds: float, connections: int, processes: int = 1
) -> str:
    """req/s, and the CPU time per call of each role (front end or master and front ends,
    workers with their zygote, and wrk itself)."""
    loadgen._wrk_load(server.host, server.port, request, connections, 1.0, 10**9)  # warm up
    root = psutil.Process(server.proc.pid)
    members = [root, *root.children(recursive=True)]
    roles = {p.pid: _role(p, root.pid, processes) for p in members}
    before = _cpu(members)
    load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = loadgen._wrk_load(server.host, server.port, request, connections, seconds, 10**9)
    load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = _cpu(members)
    # wrk is this process's child, reaped when it ends: its CPU time shows in RUSAGE_CHILDREN.
    wrk = load_after.ru_utime + load_after.ru_stime - load_before.ru_utime - load_before.ru_stime
    calls = max(result.requests, 1)
    spent: dict[str, float] = {}
    for pid, seconds_after in after.items():
        if pid in before:
            role = roles[pid]
            spent[role] = spent.get(role, 0.0) + seconds_after - before[pid]
    spent["wrk"] = wrk
    parts = ", ".join(f"{role} {value / calls * 1e6:.0f} µs/call" for role, value in spent.items())
    return f"{result.requests / result.elapsed_s:,.0f} req/s: {parts}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("settings", nargs="*", help="more tabserve settings, KEY=VALUE")
    args = parser.parse_args(argv)
    if not loadgen.wrk_available():
        print("bench.cpu needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    settings = dict(item.split("=", 1) for item in args.settings)
    processes = int(settings.get("TABSERVE_PROCESSES", "1"))
    root = Path(tempfile.mkdtemp(prefix="tabserve-cpu-"))
    tabserve = servers.start_tabserve(
        sys.executable, ServerOptions(workers=args.workers, settings=settings), root
    )
    ceiling = servers.start_ceiling(sys.executable, ServerOptions(), root)
    try:
        tabserve.wait_ready()
        ceiling.wait_ready()
        tabpy_python = str(servers.ensure_tabpy_venv() / "bin" / "python")
        subprocess.run(
            [tabpy_python, str(wl.DEPLOY_SCRIPT), tabserve.url], check=True, capture_output=True
        )
        calls = {
            "small /evaluate": wl._scalar_add,
            "/query/add2": wl._query_add2,
            "/info": wl._info,
        }
        for name, make in calls.items():
            line = measure(tabserve, make(tabserve), args.seconds, args.connections, processes)
            print(f"tabserve {name}: {line}")
        line = measure(ceiling, wl._scalar_add(ceiling), args.seconds, args.connections)
        print(f"bare Tornado: {line}")
    finally:
        tabserve.stop()
        ceiling.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
