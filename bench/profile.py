"""Where does a server's time go?  Sample it with py-spy while a workload runs.

Usage: python -m bench.profile {tabpy,tabserve} [w1|w2|w4] [--seconds 5]
Needs ``py-spy`` (pip install py-spy) and, for TabPy, the cached TabPy venv.  Prints the
share of busy samples per function (self and inclusive) for the server's main thread and for
its other threads/processes, counting only samples that hold the GIL (py-spy --gil), which
is what limits a one-process server like TabPy.  The raw stacks stay in the printed file.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import loadgen, servers
from bench import workloads as wl

# Leaf frames that mean "waiting", not "working"; excluded so shares are of busy time.
IDLE_LEAVES = ("EpollSelector.select", "_worker (concurrent", "Condition.wait", "SimpleQueue.get")


def summarise(raw: Path, top: int = 15) -> str:
    """Fold py-spy's raw stacks into per-thread self/inclusive shares of busy samples."""
    groups: dict[str, tuple[Counter[str], Counter[str]]] = {}
    busy: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        group = "main thread" if any("MainThread" in f for f in frames[:2]) else "other threads"
        selfc, incl = groups.setdefault(group, (Counter(), Counter()))
        n = int(count)
        busy[group] += n
        selfc[frames[-1]] += n
        for frame in set(frames[2:]):
            incl[frame] += n
    out = []
    for group, (selfc, incl) in groups.items():
        total = busy[group]
        out.append(f"== {group}: {total} busy samples")
        out.append("  self:")
        out += [f"    {100 * n / total:5.1f}%  {f[:110]}" for f, n in selfc.most_common(top)]
        out.append("  inclusive:")
        out += [f"    {100 * n / total:5.1f}%  {f[:110]}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("server", choices=("tabpy", "tabserve"))
    p.add_argument("workload", nargs="?", default="w2", choices=("w1", "w2", "w4"))
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="tabserve-profile-"))
    opts = servers.ServerOptions(workers=2)
    if args.server == "tabpy":
        srv = servers.start_tabpy(servers.ensure_tabpy_venv(), opts, root)
    else:
        srv = servers.start_tabserve(sys.executable, opts, root)
    raw = root / f"{args.server}-{args.workload}.txt"
    try:
        if args.workload == "w4":
            req = wl.post("/evaluate", wl.zip_sum_body(1_000_000), srv)
        else:
            req = wl._scalar_add(srv) if args.workload == "w1" else wl._zip_1k(srv)
        if args.workload == "w4":  # warm up without leaving a backlog of 40 MB calls
            asyncio.run(loadgen.fetch(srv.host, srv.port, req))
        else:
            loadgen.run_load(srv.host, srv.port, req, 8, 1, 20_000)
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(srv.proc.pid),
                "-d",
                str(int(args.seconds)),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--threads",
                "--subprocesses",
                "--idle",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy attaches
        if args.workload == "w4":
            deadline = time.monotonic() + args.seconds - 1
            for _ in range(20):  # bounded in count and time
                if time.monotonic() > deadline:
                    break
                asyncio.run(loadgen.fetch(srv.host, srv.port, req))
        else:
            loadgen.run_load(srv.host, srv.port, req, 8, args.seconds - 1, 200_000)
        spy.wait(timeout=args.seconds + 30)
    finally:
        srv.stop()
    print(summarise(raw))
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
