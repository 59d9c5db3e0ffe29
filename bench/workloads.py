"""The workloads of issues 5 and 10: how each one builds its request and measures one round.

A workload measures in *rounds*; the runner alternates the servers between rounds (ABBA...)
so that machine noise lands on both equally, then ``merge`` folds the rounds together.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import Request
from bench.servers import Server, tree_pss_bytes, tree_rss_bytes

try:  # orjson only speeds up building the 40 MB bodies; the bytes mean the same JSON
    import orjson

    def _dumps(obj: object) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


ZIP_SUM = "return [a+b for a,b in zip(_arg1,_arg2)]"
BUSY_SCRIPT = (
    "import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end:\n"
    "    pass\nreturn 1"
)
TABLE_ECHO = "import pandas as pd\nreturn pd.DataFrame(_arg1)"
# The Flight comparison: the same vectorised sum over both transports, so that what differs
# is how the columns travel (JSON lists vs Arrow), not the script.
FLIGHT_JSON_SUM = "import numpy as np\nreturn (np.asarray(_arg1) + np.asarray(_arg2)).tolist()"
FLIGHT_ARROW_SUM = "import pandas as pd\nreturn pd.DataFrame({'sum': _arg1['a'] + _arg1['b']})"
DEPLOY_SCRIPT = Path(__file__).with_name("deploy_add2.py")


@dataclass
class Settings:
    """Run-wide knobs shared by every workload."""

    duration: float = 10.0  # seconds of load per server per throughput workload
    rounds: int = 2  # alternation rounds per workload (split of duration / reps)
    smoke: bool = False
    tool: str = "auto"  # load generator: auto | wrk | asyncio
    cpu_count: int = 2
    busy_seconds: float = 5.0  # length of the CPU-bound script in w8
    # Interpreters that may have the TabPy client, for w6; each server gets one of its own
    # Python version, since cloudpickled code only loads under the version that wrote it.
    deploy_pythons: list[str] = field(default_factory=list)
    max_requests_per_s: int = 100_000  # request budget = this x duration (safety bound)


@dataclass
class Target:
    """An issue-5 goal: ``ratio`` (tabserve/TabPy >= v), ``speedup`` (TabPy/tabserve >= v)
    or ``max`` (tabserve's own figure <= v)."""

    metric: str
    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "ratio":
            return f"{self.metric} >= {self.value:g}x"
        if self.kind == "speedup":
            return f"{self.metric} >= {self.value:g}x lower"
        return f"{self.metric} <= {self.value:g}"

    def met(self, ts: dict[str, Any] | None, tp: dict[str, Any] | None) -> bool | None:
        a = _num(ts, self.metric)
        if self.kind == "max":
            return None if a is None else a <= self.value
        b = _num(tp, self.metric)
        if a is None or b is None or a == 0 or b == 0:
            return None
        return (a / b if self.kind == "ratio" else b / a) >= self.value


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    if not d or "error" in d:
        return None
    v = d.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


# ------------------------------------------------------------------------------ bodies

_BODY_CACHE: dict[tuple[Any, ...], bytes] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], object]) -> bytes:
    # The 1M-row body takes a second or two to build; build each body once per run.
    if key not in _BODY_CACHE:
        _BODY_CACHE[key] = _dumps(build())
    return _BODY_CACHE[key]


def columns(rows: int, seed: int = 5) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(rows)], [rng.random() for _ in range(rows)]


def zip_sum_body(rows: int) -> bytes:
    def build() -> object:
        a, b = columns(rows)
        return {"script": ZIP_SUM, "data": {"_arg1": a, "_arg2": b}}

    return _cached(("zip", rows), build)


def flight_json_body(rows: int) -> bytes:
    def build() -> object:
        a, b = columns(rows)
        return {"script": FLIGHT_JSON_SUM, "data": {"_arg1": a, "_arg2": b}}

    return _cached(("flight-json", rows), build)


_TABLE_CACHE: dict[int, Any] = {}


def arrow_table(rows: int) -> Any:
    """The zip-sum's two columns as a pyarrow table (pyarrow: imported only when used)."""
    if rows not in _TABLE_CACHE:
        import pyarrow as pa

        a, b = columns(rows)
        _TABLE_CACHE[rows] = pa.table({"a": pa.array(a), "b": pa.array(b)})
    return _TABLE_CACHE[rows]


def table_body(rows: int) -> bytes:
    def build() -> object:
        rng = random.Random(7)
        table = {
            "score": [rng.random() for _ in range(rows)],
            "count": [rng.randrange(1_000_000) for _ in range(rows)],
            "name": [f"customer-{i % 5000}" for i in range(rows)],
        }
        return {"script": TABLE_ECHO, "data": {"_arg1": table}}

    return _cached(("table", rows), build)


def post(path: str, body: bytes, server: Server) -> Request:
    headers = {"Content-Type": "application/json", **server.auth_headers()}
    return Request("POST", path, body, headers)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """Base class: one row of the results table."""

    id: str
    title: str
    group: str
    profile: str = "plain"  # which server pair runs it (see run.PROFILES)
    target: Target | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tabserve_only: bool = False
    kind: str = "latency"
    # Also run on the bare Tornado server (bench.ceiling), which answers every POST with 3:
    # the one-process ceiling tabserve is reported as a share of. ``ceiling_target`` is the
    # share issue 10 asks for, if any.
    ceiling: bool = False
    ceiling_target: float | None = None

    def rounds(self, s: Settings) -> int:
        return s.rounds

    def setup(self, server: Server, s: Settings) -> None:
        """Warm the server up and check that it answers this workload correctly."""
        status, body = self._call(server, self.request(server))
        self.check(status, body)

    def request(self, server: Server) -> Request:
        raise NotImplementedError

    def check(self, status: int, body: bytes) -> None:
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:300]!r}")

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        raise NotImplementedError

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _call(server: Server, req: Request, timeout: float = 300.0) -> tuple[int, bytes]:
        status, body, _ = asyncio.run(loadgen.fetch(server.host, server.port, req, timeout))
        return status, body


class Throughput(Workload):
    """N connections kept busy with one request: req/s plus p50/p99 latency."""

    def __init__(
        self,
        id: str,
        title: str,
        group: str,
        make: Callable[[Server], Request],
        expect: Callable[[Any], bool],
        concurrency: int,
        **kw: Any,
    ) -> None:
        super().__init__(id, title, group, kind="throughput", **kw)
        self.make, self.expect, self.concurrency = make, expect, concurrency
        self.params.setdefault("concurrency", concurrency)

    def request(self, server: Server) -> Request:
        return self.make(server)

    def check(self, status: int, body: bytes) -> None:
        super().check(status, body)
        if not self.expect(json.loads(body)):
            raise RuntimeError(f"unexpected result: {body[:300]!r}")

    def setup(self, server: Server, s: Settings) -> None:
        if server.name == "ceiling":
            # It answers 3 to everything: check that it answers, not what.
            status, body = self._call(server, self.request(server))
            Workload.check(self, status, body)
        else:
            super().setup(server, s)
        # A short burst so lazily started workers, imports and JITs are warm for both servers.
        warm = min(1.0, s.duration / 4)
        loadgen.run_load(
            server.host,
            server.port,
            self.request(server),
            self.concurrency,
            warm,
            20_000,
            tool="asyncio",
        )

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        secs = max(1.0, s.duration / self.rounds(s))
        budget = int(s.max_requests_per_s * secs)
        res = loadgen.run_load(
            server.host,
            server.port,
            self.request(server),
            self.concurrency,
            secs,
            budget,
            tool=s.tool,
        )
        out = res.as_dict()
        out["budget_hit"] = res.requests >= budget
        return out

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        ok = sum(r["requests"] - r["errors"] for r in rounds)
        elapsed = sum(r["elapsed_s"] for r in rounds)
        weights = [max(1, r["requests"]) for r in rounds]

        def wavg(key: str) -> float:
            # wrk reports percentiles per run only, so rounds are combined by request weight.
            total = sum(r[key] * w for r, w in zip(rounds, weights, strict=True))
            return round(total / sum(weights), 3)

        return {
            "rps": round(ok / elapsed, 1) if elapsed else 0.0,
            "p50_ms": wavg("p50_ms"),
            "p99_ms": wavg("p99_ms"),
            "max_ms": max(r["max_ms"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
            "tool": rounds[0]["tool"],
            "rounds": rounds,
        }


class SingleCall(Workload):
    """Latency of one call at a time (big bodies), ``reps`` calls spread over the rounds."""

    def __init__(
        self,
        id: str,
        title: str,
        group: str,
        body: Callable[[], bytes],
        rows: int,
        reps: int,
        check_rows: Callable[[Any], int],
        **kw: Any,
    ) -> None:
        super().__init__(id, title, group, kind="latency", **kw)
        self.body, self.rows, self.reps, self.check_rows = body, rows, reps, check_rows
        self.params.setdefault("rows", rows)

    def rounds(self, s: Settings) -> int:
        return 1 if s.smoke else self.reps

    def request(self, server: Server) -> Request:
        return post("/evaluate", self.body(), server)

    def check(self, status: int, body: bytes) -> None:
        super().check(status, body)
        got = self.check_rows(json.loads(body))
        if got != self.rows:
            raise RuntimeError(f"expected {self.rows} rows back, got {got}")

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        req = self.request(server)
        status, body, ms = asyncio.run(loadgen.fetch(server.host, server.port, req))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
        return {"ms": ms, "response_bytes": len(body)}

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        ms = [r["ms"] for r in rounds]
        p50 = statistics.median(ms)
        return {
            "p50_ms": round(p50, 3),
            "p99_ms": round(loadgen.percentile(ms, 99), 3),
            "min_ms": round(min(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3),
            "calls": len(ms),
            "rows": self.rows,
            "us_per_row": round(p50 * 1000.0 / self.rows, 4),
            "request_mb": round(len(self.body()) / 1e6, 2),
            "response_mb": round(rounds[0]["response_bytes"] / 1e6, 2),
        }


class FlightRoundTrip(Workload):
    """One Arrow Flight round trip as Tableau Prep makes it, timed end to end by the client:
    getUniquePath, DoPut of the table, POST /evaluate {script, dataPath}, GetFlightInfo of the
    result, DoGet. The same calls work against TabPy with TABPY_ARROW_ENABLE."""

    def __init__(self, id: str, title: str, group: str, rows: int, reps: int, **kw: Any):
        super().__init__(id, title, group, kind="latency", **kw)
        self.rows, self.reps = rows, reps
        self.params.setdefault("rows", rows)

    def rounds(self, s: Settings) -> int:
        return 1 if s.smoke else self.reps

    def setup(self, server: Server, s: Settings) -> None:
        # TabPy starts its Flight server in a thread after HTTP answers: wait for it.
        import pyarrow.flight as fl

        deadline = time.monotonic() + 60
        while True:
            try:
                with fl.connect(f"grpc+tcp://{server.host}:{server.flight_port}") as client:
                    list(client.do_action(fl.Action("healthcheck", b"")))
                break
            except fl.FlightUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.measure(server, s)  # answers correctly (checked there), and warms up

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        import urllib.request

        import pyarrow.flight as fl

        table = arrow_table(self.rows)
        with fl.connect(f"grpc+tcp://{server.host}:{server.flight_port}") as client:
            t0 = time.perf_counter()
            action = fl.Action("getUniquePath", b"")
            path = next(iter(client.do_action(action))).body.to_pybytes().decode()
            writer, _ = client.do_put(fl.FlightDescriptor.for_path(path), table.schema)
            writer.write_table(table)
            writer.close()
            t1 = time.perf_counter()
            body = _dumps({"script": FLIGHT_ARROW_SUM, "dataPath": path})
            headers = {"Content-Type": "application/json", **server.auth_headers()}
            request = urllib.request.Request(server.url + "evaluate", body, headers)
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read())
            t2 = time.perf_counter()
            info = client.get_flight_info(fl.FlightDescriptor.for_path(answer["outputDataPath"]))
            result = client.do_get(info.endpoints[0].ticket).read_all()
            t3 = time.perf_counter()
        if result.num_rows != self.rows or result.column_names != ["sum"]:
            raise RuntimeError(f"expected {self.rows} sums back, got {result.schema}")
        return {
            "ms": (t3 - t0) * 1000,
            "put_ms": (t1 - t0) * 1000,
            "evaluate_ms": (t2 - t1) * 1000,
            "get_ms": (t3 - t2) * 1000,
        }

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        ms = [r["ms"] for r in rounds]
        p50 = statistics.median(ms)
        return {
            "p50_ms": round(p50, 3),
            "p99_ms": round(loadgen.percentile(ms, 99), 3),
            "min_ms": round(min(ms), 3),
            "calls": len(ms),
            "rows": self.rows,
            "us_per_row": round(p50 * 1000.0 / self.rows, 4),
            **{
                key: round(statistics.median(r[key] for r in rounds), 3)
                for key in ("put_ms", "evaluate_ms", "get_ms")
            },
        }


class InfoWhileBusy(Workload):
    """w8: /info latency while every worker (TabPy: cpu_count threads) runs a busy script."""

    def __init__(self, id: str, title: str, group: str, **kw: Any) -> None:
        super().__init__(id, title, group, kind="latency", **kw)

    def rounds(self, s: Settings) -> int:
        # Each round costs busy_seconds per server; two rounds (AB BA) are enough.
        return 1 if s.smoke else min(2, s.rounds)

    def request(self, server: Server) -> Request:
        return Request("GET", "/info", b"", server.auth_headers())

    def busy_slots(self, server: Server, s: Settings) -> int:
        if server.name == "tabserve" and server.options.workers:
            return server.options.workers
        return s.cpu_count  # TabPy's evaluate pool has cpu_count threads

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        return asyncio.run(self._measure(server, s))

    async def _measure(self, server: Server, s: Settings) -> dict[str, Any]:
        busy_req = post(
            "/evaluate",
            _dumps({"script": BUSY_SCRIPT.format(secs=s.busy_seconds), "data": {}}),
            server,
        )
        slots = self.busy_slots(server, s)
        busy = [
            asyncio.create_task(
                loadgen.fetch(server.host, server.port, busy_req, s.busy_seconds + 60)
            )
            for _ in range(slots)
        ]
        await asyncio.sleep(min(0.5, s.busy_seconds / 4))  # let the busy scripts start
        conn = loadgen.HttpConnection(server.host, server.port)
        raw = self.request(server).encode(server.host, server.port)
        lat: list[float] = []
        statuses: list[int] = []
        stop = time.perf_counter() + s.busy_seconds * 0.7
        try:
            # Probe at most every 5 ms (Tableau polls, it does not flood); bounded by count too.
            while time.perf_counter() < stop and len(lat) < 5000:
                t0 = time.perf_counter()
                status, _ = await asyncio.wait_for(conn.send(raw), 30)
                lat.append((time.perf_counter() - t0) * 1000.0)
                statuses.append(status)
                await asyncio.sleep(0.005)
        finally:
            await conn.close()
        results = await asyncio.gather(*busy, return_exceptions=True)
        busy_ok = sum(1 for r in results if isinstance(r, tuple) and r[0] == 200)
        if any(st != 200 for st in statuses):
            raise RuntimeError(f"/info answered {sorted(set(statuses))}")
        return {"lat": lat, "busy_calls": slots, "busy_ok": busy_ok}

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        lat = [x for r in rounds for x in r["lat"]]
        return {
            "p50_ms": round(loadgen.percentile(lat, 50), 3),
            "p99_ms": round(loadgen.percentile(lat, 99), 3),
            "max_ms": round(max(lat), 3),
            "probes": len(lat),
            "busy_calls": rounds[0]["busy_calls"],
            "busy_ok": sum(r["busy_ok"] for r in rounds),
        }


class PeakMemory(SingleCall):
    """w9: peak memory of the whole server process tree (sampled) during 1M-row calls: RSS,
    which counts a page shared by several processes in each, and PSS, which divides it."""

    def measure(self, server: Server, s: Settings) -> dict[str, Any]:
        idle = tree_rss_bytes(server.proc.pid)
        peak = idle
        peak_pss = tree_pss_bytes(server.proc.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_pss
            while not done.is_set():
                peak = max(peak, tree_rss_bytes(server.proc.pid))
                peak_pss = max(peak_pss, tree_pss_bytes(server.proc.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out = super().measure(server, s)
        finally:
            done.set()
            sampler.join()
        out.update(idle_mb=idle / 1e6, peak_mb=peak / 1e6, peak_pss_mb=peak_pss / 1e6)
        return out

    def merge(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "peak_rss_mb": round(max(r["peak_mb"] for r in rounds), 1),
            "peak_pss_mb": round(max(r["peak_pss_mb"] for r in rounds), 1),
            "idle_rss_mb": round(min(r["idle_mb"] for r in rounds), 1),
            "rows": self.rows,
            "calls": len(rounds),
        }


class QueryAdd2(Throughput):
    """w6: /query/add2 of a function deployed with the real TabPy client."""

    def setup(self, server: Server, s: Settings) -> None:
        if server.name == "ceiling":  # nothing to deploy: it answers 3 on every path
            super().setup(server, s)
            return
        python = tabpy_client_python([server.python, *s.deploy_pythons], like=server.python)
        if python is None:
            raise RuntimeError(
                f"no Python like {server.python} with tabpy.tabpy_tools installed to deploy add2"
            )
        proc = subprocess.run(
            [python, str(DEPLOY_SCRIPT), server.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            # The client's traceback ends with the line that says what went wrong.
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"deploy with TabPy's client failed: {lines[-1][:400]}")
        super().setup(server, s)


def tabpy_client_python(candidates: list[str], like: str) -> str | None:
    """The first interpreter that can import the unmodified TabPy client and has the same
    Python version as ``like``."""
    version = "import sys; print(sys.version_info[:2])"
    wanted = subprocess.run([like, "-c", version], capture_output=True, text=True).stdout
    for python in dict.fromkeys(candidates):
        probe = subprocess.run(
            [python, "-c", f"import tabpy.tabpy_tools.client; {version}"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout == wanted:
            return python
    return None


# --------------------------------------------------------------------------- catalogue


def _scalar_add(server: Server) -> Request:
    body = _dumps({"script": "return _arg1+_arg2", "data": {"_arg1": 1, "_arg2": 2}})
    return post("/evaluate", body, server)


def _zip_1k(server: Server) -> Request:
    return post("/evaluate", zip_sum_body(1000), server)


def _query_add2(server: Server) -> Request:
    return post("/query/add2", _dumps({"data": {"x": 1, "y": 2}}), server)


def _zip_10k(server: Server) -> Request:
    return post("/evaluate", zip_sum_body(10_000), server)


def _zip_10k_cached(server: Server) -> Request:
    """The same call, accepting a result up to an hour old (issue 12). TabPy ignores the
    field and runs it every time, as tabserve does without it."""
    body = _cached(("zip_sum_cached", 10_000), lambda: _cache_body(10_000))
    return post("/evaluate", body, server)


def _scalar_add_cached(server: Server) -> Request:
    body = _dumps({"script": "return _arg1+_arg2", "data": {"_arg1": 1, "_arg2": 2},
                   "max_age": 3600})  # fmt: skip
    return post("/evaluate", body, server)


def _info(server: Server) -> Request:
    return Request("GET", "/info", b"", dict(server.auth_headers()))


def _cache_body(rows: int) -> dict[str, Any]:
    a, b = columns(rows)
    return {"script": ZIP_SUM, "data": {"_arg1": a, "_arg2": b}, "max_age": 3600}


def _rows_of_list(v: Any) -> int:
    return len(v) if isinstance(v, list) else -1


def _rows_of_table(v: Any) -> int:
    if not isinstance(v, dict) or len(v) != 3:
        return -1
    lengths = {len(col) for col in v.values()}
    return lengths.pop() if len(lengths) == 1 else -1


def catalogue(smoke: bool = False) -> list[Workload]:
    """Every workload in run order.  Sizes are the same in smoke mode; only time shrinks."""
    reps_big = 2 if smoke else 3

    def zip_call(id: str, title: str, group: str, rows: int, reps: int, **kw: Any) -> SingleCall:
        return SingleCall(
            id, title, group, lambda: zip_sum_body(rows), rows, reps, _rows_of_list, **kw
        )

    items: list[Workload] = [
        Throughput(
            "w1_c8",
            "scalar _arg1+_arg2, c=8",
            "w1",
            _scalar_add,
            lambda v: v == 3,
            8,
            target=Target("rps", "ratio", 2.5),
            ceiling=True,
            ceiling_target=0.8,
        ),
        Throughput(
            "w1_c64",
            "scalar _arg1+_arg2, c=64",
            "w1",
            _scalar_add,
            lambda v: v == 3,
            64,
            target=Target("rps", "ratio", 2.5),
            ceiling=True,
        ),
        Throughput(
            "w2",
            "1k-row zip-sum, c=8",
            "w2",
            _zip_1k,
            lambda v: _rows_of_list(v) == 1000,
            8,
            target=Target("rps", "ratio", 5),
        ),
        zip_call("w3", "100k-row zip-sum, one call", "w3", 100_000, 5),
        zip_call(
            "w4",
            "1M-row zip-sum (~40 MB), one call",
            "w4",
            1_000_000,
            reps_big,
            target=Target("p50_ms", "speedup", 4),
        ),
        SingleCall(
            "w5",
            "Table Extension echo 100k x 3",
            "w5",
            lambda: table_body(100_000),
            100_000,
            5,
            _rows_of_table,
        ),
        QueryAdd2(
            "w6",
            "/query/add2 deployed function, c=8",
            "w6",
            _query_add2,
            lambda v: isinstance(v, dict) and v.get("response") == 3,
            8,
            target=Target("rps", "ratio", 2),
            ceiling=True,
        ),
        Throughput(
            "w7",
            "w1 with basic auth, c=8",
            "w7",
            _scalar_add,
            lambda v: v == 3,
            8,
            profile="auth",
            target=Target("rps", "ratio", 10),
        ),
        InfoWhileBusy(
            "w8", "/info while all workers are CPU-busy", "w8", target=Target("p99_ms", "max", 10)
        ),
        PeakMemory(
            "w9",
            "peak memory (process tree, RSS and PSS) during 1M-row call",
            "w9",
            lambda: zip_sum_body(1_000_000),
            1_000_000,
            reps_big,
            _rows_of_list,
        ),
    ]
    # The Flight comparison (issue 14): 1M rows over JSON and over Arrow Flight, on servers
    # started with TABPY_ARROW_ENABLE (TabPy included), so both paths share one profile.
    items.append(
        SingleCall(
            "flight_json",
            "1M-row vectorised sum over JSON (Flight on)",
            "flight",
            lambda: flight_json_body(1_000_000),
            1_000_000,
            reps_big,
            _rows_of_list,
            profile="arrow",
        )
    )
    items.append(
        FlightRoundTrip(
            "flight_arrow",
            "1M-row vectorised sum over Arrow Flight",
            "flight",
            1_000_000,
            reps_big,
            profile="arrow",
        )
    )
    # The result cache (issue 12): the same 10k-row call run fresh every time, and answered
    # from the cache (max_age), side by side; TabPy runs both fresh.
    items.append(
        Throughput(
            "cache_fresh",
            "10k-row zip-sum, c=8, no max_age (always run)",
            "cache",
            _zip_10k,
            lambda v: _rows_of_list(v) == 10_000,
            8,
        )
    )
    items.append(
        Throughput(
            "cache_hit",
            "10k-row zip-sum, c=8, max_age=3600 (cache hits)",
            "cache",
            _zip_10k_cached,
            lambda v: _rows_of_list(v) == 10_000,
            8,
        )
    )
    # What a hit costs, against what the cheapest request costs: /info (TabPy runs the
    # scalar call every time, so only tabserve's hit figure is a cache figure).
    items.append(
        Throughput(
            "cache_hit_scalar",
            "scalar _arg1+_arg2, c=8, max_age=3600 (cache hits)",
            "cache",
            _scalar_add_cached,
            lambda v: v == 3,
            8,
        )
    )
    items.append(
        Throughput("info_c8", "GET /info, c=8", "cache", _info, lambda v: "versions" in v, 8)
    )
    for rows, label in ((10, "10"), (1000, "1k"), (10_000, "10k")):
        items.append(zip_call(f"rows_{label}", f"zip-sum {label} rows, one call", "rows", rows, 10))
    for n in (1, 2, 4):
        items.append(
            Throughput(
                f"workers_{n}",
                f"w1 c=64, tabserve with {n} worker(s)",
                "workers",
                _scalar_add,
                lambda v: v == 3,
                64,
                # TabPy (always cpu_count threads) is re-measured alongside each worker
                # count, so every ratio comes from the same alternated minutes.
                profile=f"workers:{n}",
                params={"workers": n},
            )
        )
    return items


def python_candidates(tabpy_venv: Path | None) -> list[str]:
    found = [str(tabpy_venv / "bin" / "python")] if tabpy_venv else []
    return [*found, sys.executable]
