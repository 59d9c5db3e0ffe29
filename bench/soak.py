"""Soak: a bounded run of mixed traffic against one tabserve, judged on what must not drift.

    python -m bench.soak                               # 10 minutes, a sample every minute
    python -m bench.soak --duration 60 --interval 10   # what CI runs (tests/test_soak.py)
    python -m bench.soak --markdown docs/soak.md       # the committed result (quiet machine)

Traffic, from a few client threads with kept-alive connections and Basic auth: small and
100,000-row /evaluate calls, /query of a deployed function, deploys of new versions of it,
runaway scripts that time out (408), scripts that crash their worker on purpose (500), and
wrong passwords (401). Every second it looks at the RSS and open file descriptors of the
server and of each worker, and for zombies; each interval reports the peaks, the p99
latency and the worker replacements so far.

Pass (exit 0): no 5xx but the crashes it caused (and every request answered); the server's
RSS and the largest worker's RSS grow under 10 % from the first interval (the warm-up) to
the last; the server's open file descriptors stay flat (within 5 of the first interval); no
zombie lives two seconds, none is left at the end; SIGTERM then exits 0. The run is bounded
in time and in requests, and talks to loopback only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import requests

from bench.servers import BENCH_PASSWORD, BENCH_USER, ServerOptions, start_tabserve

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Operation: (weight, expected status). The crash is the only 5xx allowed.
OPERATIONS: dict[str, tuple[float, int]] = {
    "evaluate small": (50, 200),
    "evaluate 100k rows": (4, 200),
    "query": (30, 200),
    "deploy": (1, 200),
    "runaway (timeout)": (0.2, 408),
    "crash": (0.4, 500),
    "wrong password": (6, 401),
}
# A call queued behind runaways for longer than the timeout is answered 408 (TabPy's
# timeout counts from arrival): expected under this load, reported, not a failure.
TOLERATED = {408}
CLIENTS = 4
TIMEOUT_S = 5.0  # TABPY_EVALUATE_TIMEOUT: what a runaway is cut off at
MAX_REQUESTS = 2_000_000  # a bound on the count as well as on the time
RSS_GROWTH_LIMIT = 0.10
FD_DRIFT_LIMIT = 5
BIG = list(range(100_000))


def model_version(version: int):  # type: ignore[no-untyped-def]
    def add(x: list[float], y: list[float]) -> list[float]:
        return [a + b + 0 * version for a, b in zip(x, y, strict=True)]

    return add


def deploy_body(version: int) -> dict[str, Any]:
    return {
        "name": "soak_add",
        "type": "model",
        "description": f"soak version {version}",
        "archive": base64.b64encode(cloudpickle.dumps(model_version(version))).decode(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }


@dataclass
class Poll:
    """One look at the process tree (every second)."""

    server_rss_mb: float
    server_fds: int
    workers: dict[int, tuple[float, int]]  # pid -> (RSS MB, open fds)
    zombies: list[int]


@dataclass
class Sample:
    """One interval, summed up from its polls: peaks, so a snapshot's timing cannot mislead
    (a worker replaced a moment ago is small until it runs something)."""

    at: float
    server_rss_mb: float
    server_fds: tuple[int, int]  # min, max
    worker_rss_mb: float  # the largest worker
    worker_fds: int  # the most any worker held
    workers: int  # alive at the end of the interval
    restarts: float  # worker replacements so far
    zombies: list[int]  # seen in three polls in a row (two seconds or more)


@dataclass
class Result:
    duration_s: float
    interval_s: float
    requests: int = 0
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    p99_ms_by_interval: list[float] = field(default_factory=list)
    p99_ms_by_operation: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    verdicts: dict[str, tuple[bool, str]] = field(default_factory=dict)
    final_zombies: list[int] = field(default_factory=list)
    shutdown_exit_code: int | None = None

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.verdicts.values())


class Traffic:
    """The client threads and what they saw."""

    def __init__(self, url: str, deadline: float, start: float, interval: float) -> None:
        self.url = url.rstrip("/")
        self.deadline = deadline
        self.start = start
        self.interval = interval
        self.lock = threading.Lock()
        self.count = 0
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.latencies: dict[int, list[float]] = defaultdict(list)
        self.by_operation: dict[str, list[float]] = defaultdict(list)
        self.version = 1
        self.errors: list[str] = []

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        names = list(OPERATIONS)
        weights = [OPERATIONS[n][0] for n in names]
        with requests.Session() as session:
            session.auth = (BENCH_USER, BENCH_PASSWORD)
            while time.monotonic() < self.deadline:
                with self.lock:
                    if self.count >= MAX_REQUESTS:
                        return
                    self.count += 1
                operation = rng.choices(names, weights)[0]
                started = time.monotonic()
                try:
                    status = self._send(session, operation, rng)
                except requests.RequestException as exc:
                    status = 0  # no answer at all: counted as unexpected
                    with self.lock:
                        self.errors.append(f"{operation}: {exc}")
                elapsed = time.monotonic() - started
                bucket = int((started - self.start) // self.interval)
                with self.lock:
                    self.statuses[operation][status] += 1
                    self.latencies[bucket].append(elapsed)
                    self.by_operation[operation].append(elapsed)

    def _send(self, session: requests.Session, operation: str, rng: random.Random) -> int:
        url = self.url
        if operation == "evaluate small":
            data = {"_arg1": [rng.random() for _ in range(10)]}
            body = {"script": "return [x + 1 for x in _arg1]", "data": data}
            return session.post(url + "/evaluate", json=body, timeout=60).status_code
        if operation == "evaluate 100k rows":
            body = {"script": "return [x * 2 for x in _arg1]", "data": {"_arg1": BIG}}
            return session.post(url + "/evaluate", json=body, timeout=60).status_code
        if operation == "query":
            body = {"data": {"x": [1, 2, 3], "y": [4, 5, 6]}}
            return session.post(url + "/query/soak_add", json=body, timeout=60).status_code
        if operation == "deploy":
            with self.lock:
                self.version += 1
                version = self.version
            body = {**deploy_body(version), "should_update_version": True}
            return session.put(url + "/endpoints/soak_add", json=body, timeout=60).status_code
        if operation == "runaway (timeout)":
            body = {"script": "while True:\n    pass", "data": {}}
            return session.post(url + "/evaluate", json=body, timeout=60).status_code
        if operation == "crash":
            body = {"script": "import os\nos._exit(3)", "data": {}}
            return session.post(url + "/evaluate", json=body, timeout=60).status_code
        if operation == "wrong password":
            return session.get(
                url + "/endpoints", auth=(BENCH_USER, "wrong"), timeout=60
            ).status_code
        raise ValueError(operation)


def poll(pid: int) -> Poll:
    import psutil  # bench-only dependency

    server = psutil.Process(pid)
    workers: dict[int, tuple[float, int]] = {}
    zombies: list[int] = []
    for proc in server.children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                zombies.append(proc.pid)
            else:
                workers[proc.pid] = (proc.memory_info().rss / 1e6, proc.num_fds())
        except psutil.NoSuchProcess:
            continue
    return Poll(server.memory_info().rss / 1e6, server.num_fds(), workers, zombies)


def restarts_so_far(url: str) -> float:
    metrics = requests.get(url + "/metrics", auth=(BENCH_USER, BENCH_PASSWORD), timeout=30).text
    for line in metrics.splitlines():
        if line.startswith("tabserve_worker_restarts_total "):
            return float(line.split()[1])
    return 0.0


def summarize(at: float, polls: list[Poll], restarts: float) -> Sample:
    lingering = sorted(
        {
            pid
            for a, b, c in zip(polls, polls[1:], polls[2:], strict=False)
            for pid in c.zombies
            if pid in a.zombies and pid in b.zombies
        }
    )
    return Sample(
        at=round(at, 1),
        server_rss_mb=round(max(p.server_rss_mb for p in polls), 1),
        server_fds=(min(p.server_fds for p in polls), max(p.server_fds for p in polls)),
        worker_rss_mb=round(max((r for p in polls for r, _ in p.workers.values()), default=0), 1),
        worker_fds=max((f for p in polls for _, f in p.workers.values()), default=0),
        workers=len(polls[-1].workers),
        restarts=restarts,
        zombies=lingering,
    )


def judge(result: Result) -> None:
    unexpected = sum(result.unexpected.values())
    five_xx = {
        op: n
        for op, counts in result.statuses.items()
        for status, n in counts.items()
        if status.startswith("5") and op != "crash"
    }
    result.verdicts["no 5xx but the deliberate crashes"] = (
        not five_xx and unexpected == 0,
        f"unexpected answers: {result.unexpected or 'none'}",
    )
    first, last = result.samples[0], result.samples[-1]
    for label, before, after in (
        ("server RSS", first.server_rss_mb, last.server_rss_mb),
        ("peak worker RSS", first.worker_rss_mb, last.worker_rss_mb),
    ):
        growth = after / before - 1 if before else 0.0
        result.verdicts[f"{label} growth under {RSS_GROWTH_LIMIT:.0%}"] = (
            growth < RSS_GROWTH_LIMIT,
            f"{before:.1f} MB in the first interval, {after:.1f} MB in the last ({growth:+.1%})",
        )
    baseline = first.server_fds[1]
    highest = max(s.server_fds[1] for s in result.samples)
    result.verdicts["server file descriptors flat"] = (
        highest - baseline <= FD_DRIFT_LIMIT,
        f"at most {baseline} in the first interval, at most {highest} in any",
    )
    lingering = sorted({pid for s in result.samples for pid in s.zombies})
    result.verdicts["no zombie processes"] = (
        not lingering and not result.final_zombies,
        f"lingering 2 s or more: {lingering or 'none'}; after the run: "
        f"{result.final_zombies or 'none'}",
    )
    result.verdicts["clean shutdown"] = (
        result.shutdown_exit_code == 0,
        f"exit code {result.shutdown_exit_code} after SIGTERM",
    )


def run(duration: float, interval: float, seed: int) -> Result:
    result = Result(duration_s=duration, interval_s=interval)
    root = Path(tempfile.mkdtemp(prefix="tabserve-soak-"))
    settings = {"TABSERVE_WORKERS": "2", "TABSERVE_AUTH_MAX_DELAY": "0"}
    if os.geteuid() == 0:
        settings["TABSERVE_WORKER_USER"] = "root"  # as the tests do: pyenv lives in /root
    options = ServerOptions(timeout_s=TIMEOUT_S, auth=True, settings=settings)
    server = start_tabserve(sys.executable, options, root)
    url = server.url.rstrip("/")
    try:
        created = requests.post(
            url + "/endpoints", json=deploy_body(1), auth=(BENCH_USER, BENCH_PASSWORD), timeout=60
        )
        created.raise_for_status()
        started = time.monotonic()
        traffic = Traffic(url, started + duration, started, interval)
        threads = [
            threading.Thread(target=traffic.run, args=(seed + i,), daemon=True)
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        polls: list[Poll] = []
        boundary = started + interval
        end = started + duration
        while time.monotonic() < end:
            polls.append(poll(server.proc.pid))
            if time.monotonic() >= min(boundary, end - 1.0) - 0.5:
                at = time.monotonic() - started
                result.samples.append(summarize(at, polls, restarts_so_far(url)))
                print(_sample_line(result.samples[-1]), file=sys.stderr, flush=True)
                polls = polls[-2:]  # zombie runs may span the boundary
                boundary += interval
            time.sleep(1.0)
        for thread in threads:
            thread.join(timeout=120)
        time.sleep(2.0)  # let the last replacements settle
        result.final_zombies = poll(server.proc.pid).zombies
        result.requests = traffic.count
        for operation, counts in traffic.statuses.items():
            result.statuses[operation] = {str(s): n for s, n in sorted(counts.items())}
            expected = OPERATIONS[operation][1]
            wrong = sum(n for s, n in counts.items() if s != expected and s not in TOLERATED)
            if wrong:
                result.unexpected[operation] = wrong
        buckets = sorted(traffic.latencies)
        result.p99_ms_by_interval = [_p99(traffic.latencies[b]) for b in buckets]
        result.p99_ms_by_operation = {op: _p99(v) for op, v in traffic.by_operation.items()}
        for error in traffic.errors[:5]:
            print(f"soak: no answer: {error}", file=sys.stderr)
    finally:
        server.proc.send_signal(15)
        try:
            result.shutdown_exit_code = server.proc.wait(timeout=60)
        finally:
            server.stop()
    judge(result)
    return result


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return round(1000 * (values[0] if values else 0.0), 1)
    return round(1000 * statistics.quantiles(values, n=100)[98], 1)


def _sample_line(s: Sample) -> str:
    return (
        f"soak: t={s.at:.0f}s server {s.server_rss_mb:.1f} MB, {s.server_fds[0]}-"
        f"{s.server_fds[1]} fds; {s.workers} workers, peak {s.worker_rss_mb:.1f} MB, "
        f"{s.worker_fds} fds; replacements {s.restarts:.0f}; zombies {len(s.zombies)}"
    )


def report(result: Result) -> str:
    """The result as Markdown: what docs/soak.md holds."""
    lines = [
        f"Duration {result.duration_s:.0f} s, a sample every {result.interval_s:.0f} s, "
        f"{CLIENTS} client threads, 2 workers, TABPY_EVALUATE_TIMEOUT = {TIMEOUT_S:g} s; "
        f"{result.requests} requests. **{'PASS' if result.passed else 'FAIL'}**",
        "",
        "| Verdict | | Measured |",
        "|---|---|---|",
    ]
    for name, (ok, detail) in result.verdicts.items():
        lines.append(f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |")
    lines += ["", "| Operation | Answers by status | p99 ms |", "|---|---|---|"]
    for operation in OPERATIONS:
        counts = result.statuses.get(operation, {})
        shown = ", ".join(f"{s}: {n}" for s, n in counts.items()) or "none"
        lines.append(f"| {operation} | {shown} | {result.p99_ms_by_operation.get(operation, 0)} |")
    lines += [
        "",
        "| Until | p99 ms (all) | Server RSS MB | Server fds | Peak worker RSS MB | "
        "Worker fds | Workers | Replacements so far | Zombies (2 s+) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, s in enumerate(result.samples):
        p99 = result.p99_ms_by_interval[index] if index < len(result.p99_ms_by_interval) else "-"
        lines.append(
            f"| {s.at:.0f} s | {p99} | {s.server_rss_mb:.1f} | {s.server_fds[0]}-"
            f"{s.server_fds[1]} | {s.worker_rss_mb:.1f} | {s.worker_fds} | {s.workers} | "
            f"{s.restarts:.0f} | {len(s.zombies)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the result as Markdown")
    args = parser.parse_args(argv)
    if not 0 < args.interval <= args.duration:
        parser.error("need 0 < --interval <= --duration")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: {args.duration:g} s, seed {seed}", file=sys.stderr, flush=True)
    result = run(args.duration, args.interval, seed)
    text = report(result)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
