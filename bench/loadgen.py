"""Load generators: ``wrk`` when installed, else a small asyncio HTTP/1.1 client.

Both keep N keep-alive connections busy with one fixed request and stop at whichever
comes first: the duration or the request budget.  Both only ever talk to loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Request:
    """One HTTP request, sent verbatim again and again."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, host: str, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}"]
        if self.body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(self.body)}")
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass
class LoadResult:
    """What one load run measured.  Latencies are in milliseconds."""

    requests: int
    errors: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    statuses: dict[str, int]
    tool: str

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "requests": self.requests,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "statuses": self.statuses,
            "tool": self.tool,
        }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; good enough for thousands of samples, exact for few."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(pct / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def _check_host(host: str) -> None:
    # The harness must never generate load against anything but this machine.
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load non-loopback host {host!r}")


# --------------------------------------------------------------------------- asyncio client


class HttpConnection:
    """A minimal keep-alive HTTP/1.1 connection (Content-Length or chunked replies)."""

    def __init__(self, host: str, port: int) -> None:
        _check_host(host)
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        # A large limit so readuntil() copes with big header blocks; bodies use readexactly.
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request and return (status, body)."""
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = head.lower()
        body: bytes
        marker = b"\r\ncontent-length:"
        idx = headers.find(marker)
        if idx >= 0:
            end = headers.find(b"\r\n", idx + len(marker))
            body = await self.reader.readexactly(int(headers[idx + len(marker) : end]))
        elif b"\r\ntransfer-encoding: chunked" in headers:
            body = await self._read_chunked()
        else:
            body = await self.reader.read()
            await self.close()
            return status, body
        if b"\r\nconnection: close" in headers:
            await self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


async def fetch(
    host: str, port: int, req: Request, timeout: float = 300.0
) -> tuple[int, bytes, float]:
    """One request on a fresh connection: (status, body, latency in ms)."""
    conn = HttpConnection(host, port)
    try:
        start = time.perf_counter()
        status, body = await asyncio.wait_for(conn.send(req.encode(host, port)), timeout)
        return status, body, (time.perf_counter() - start) * 1000.0
    finally:
        await conn.close()


async def _asyncio_load(
    host: str,
    port: int,
    req: Request,
    concurrency: int,
    duration: float,
    max_requests: int,
) -> LoadResult:
    raw = req.encode(host, port)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors = 0
    failed_io = 0  # requests that got no HTTP reply at all
    budget = max_requests
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        nonlocal budget, errors, failed_io
        conn = HttpConnection(host, port)
        try:
            # Both bounds are checked before every request: time and total count.
            while budget > 0 and time.perf_counter() < deadline:
                budget -= 1
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.send(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    statuses[type(exc).__name__] += 1
                    errors += 1
                    failed_io += 1
                    await conn.close()
                    continue
                latencies.append((time.perf_counter() - t0) * 1000.0)
                statuses[str(status)] += 1
                if status != 200:
                    errors += 1
        finally:
            await conn.close()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        # Hard stop in case a server hangs: duration plus a generous grace for in-flight calls.
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 120.0)
    except asyncio.TimeoutError:
        errors += concurrency
        statuses["timeout"] += concurrency
    elapsed = time.perf_counter() - start
    return LoadResult(
        requests=len(latencies) + failed_io,
        errors=errors,
        elapsed_s=elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_ms=statistics.fmean(latencies) if latencies else float("nan"),
        max_ms=max(latencies) if latencies else float("nan"),
        statuses=dict(statuses),
        tool="asyncio",
    )


# --------------------------------------------------------------------------------- wrk

# The Lua script sets the request, stops each thread after its share of the request budget
# (so wrk is bounded by count as well as by -d), and prints exact figures as JSON at the end.
_WRK_LUA = """
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = os.getenv("BENCH_METHOD")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then wrk.headers["Authorization"] = auth end
local budget = tonumber(os.getenv("BENCH_BUDGET"))
local seen = 0
local bad = 0
function response(status, headers, body)
  seen = seen + 1
  if seen >= budget then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "status": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50": %f, "p99": %f, "mean": %f, "max": %f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _wrk_load(
    host: str,
    port: int,
    req: Request,
    concurrency: int,
    duration: float,
    max_requests: int,
) -> LoadResult:
    # One wrk thread: on a 2-core machine every core wrk takes is one the server loses.
    threads = 1
    unsupported = set(req.headers) - {"Content-Type", "Authorization"}
    if unsupported:
        raise ValueError(f"wrk backend cannot send headers {sorted(unsupported)}")
    with tempfile.TemporaryDirectory(prefix="tabserve-wrk-") as tmp:
        lua = os.path.join(tmp, "bench.lua")
        body = os.path.join(tmp, "body")
        with open(lua, "w") as fh:
            fh.write(_WRK_LUA)
        with open(body, "wb") as fh:
            fh.write(req.body)
        env = dict(
            os.environ,
            BENCH_BODY_FILE=body,
            BENCH_METHOD=req.method,
            BENCH_AUTH=req.headers.get("Authorization", ""),
            BENCH_BUDGET=str(max(1, max_requests // threads)),
        )
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "60s",
            "-s",
            lua,
            f"http://{host}:{port}{req.path}",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    data = json.loads(line[len("BENCH_JSON ") :])
    errors = data["status"] + data["connect"] + data["read"] + data["write"] + data["timeout"]
    statuses = {k: data[k] for k in ("status", "connect", "read", "write", "timeout") if data[k]}
    statuses["ok"] = data["requests"] - data["status"]
    return LoadResult(
        requests=data["requests"],
        errors=errors,
        elapsed_s=data["duration_us"] / 1e6,
        p50_ms=data["p50"] / 1000.0,
        p99_ms=data["p99"] / 1000.0,
        mean_ms=data["mean"] / 1000.0,
        max_ms=data["max"] / 1000.0,
        statuses=statuses,
        tool="wrk",
    )


def run_load(
    host: str,
    port: int,
    req: Request,
    concurrency: int,
    duration: float,
    max_requests: int,
    tool: str = "auto",
) -> LoadResult:
    """Keep ``concurrency`` connections busy for ``duration`` s or ``max_requests`` requests."""
    _check_host(host)
    if tool == "wrk" or (tool == "auto" and wrk_available() and duration >= 1):
        return _wrk_load(host, port, req, concurrency, duration, max_requests)
    return asyncio.run(_asyncio_load(host, port, req, concurrency, duration, max_requests))
