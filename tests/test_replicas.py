"""Scale-out for real: PostgreSQL (Debian's), HAProxy (Debian's, with deploy/haproxy.cfg)
and three tabserve replicas on loopback, sharing the store.

One module-scoped cluster, then its life in order: deploy with TabPy's unmodified client
through the load balancer, query every replica directly, measure propagation, deploy one
name from two replicas at once, kill a replica with SIGKILL under a bounded load, restart
PostgreSQL under load, and check that nothing was lost. Counts are printed (run with -s).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import psycopg
import pytest
import requests
from pg import PostgresServer
from tabpy.tabpy_tools.client import Client

from helpers import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN = ("admin", "replicas-admin-pass")
QUERY_USER = ("reader", "replicas-reader-pass")
# The bounded load: this many client threads, each sending one request at a time.
LOAD_THREADS = 4


class HAProxy:
    """deploy/haproxy.cfg as shipped, but bound to loopback ports with loopback servers."""

    def __init__(self, workdir: Path, backends: list[int]) -> None:
        self.port, self.stats_port = free_port(), free_port()
        text = (ROOT / "deploy" / "haproxy.cfg").read_text()
        head, rest = text.split("    # servers begin\n")
        _, tail = rest.split("    # servers end\n")
        servers = "".join(
            f"    server replica{i + 1} 127.0.0.1:{port} check\n" for i, port in enumerate(backends)
        )
        text = head + servers + tail
        text = text.replace("    bind :9004\n", f"    bind 127.0.0.1:{self.port}\n")
        text += (
            f"\nfrontend stats\n    bind 127.0.0.1:{self.stats_port}\n"
            "    stats enable\n    stats uri /stats\n"
        )
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(text)
        self.log_file = workdir / "haproxy.log"
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """Each server's health as HAProxy sees it (UP, DOWN, ...)."""
        text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait(self, wanted: Callable[[dict[str, str]], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                if wanted(self.states()):
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy: timed out waiting for {what}: {self.states()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@dataclass
class Cluster:
    postgres: PostgresServer
    url: str
    replicas: list[Server]
    lb: HAProxy
    upload: Path
    workdir: Path
    config: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # what the clients were told

    def start_replica(self, index: int) -> Server:
        return Server(self.workdir / f"replica{index}", self.config, {}, auth=ADMIN)


def _tabserve(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tabserve", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("replicas")
    url = postgres.fresh_database("replicas")
    _tabserve("store", "migrate", "--store", url)
    _tabserve("user", "add", "-u", ADMIN[0], "--password-stdin", "--store", url, stdin=ADMIN[1])
    _tabserve(
        "user", "add", "-u", QUERY_USER[0], "--password-stdin", "--permissions", "query",
        "--store", url, stdin=QUERY_USER[1],
    )  # fmt: skip
    upload = workdir / "uploads"  # TabPy's client writes here; every replica names it
    upload.mkdir()
    config = {
        "TABSERVE_STORE": url,
        "TABSERVE_USERS": "store",
        "TABSERVE_UPLOAD_PATH": str(upload),
        "TABSERVE_WORKERS": "1",
        "TABPY_EVALUATE_TIMEOUT": "10",
    }
    partial = Cluster(postgres, url, [], None, upload, workdir, config)  # type: ignore[arg-type]
    replicas: list[Server | None] = [None] * 3
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            (workdir / f"replica{i + 1}").mkdir()
            replicas[i] = partial.start_replica(i + 1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [r for r in replicas if r is not None]
    try:
        assert not errors, errors
        partial.replicas = started
        partial.lb = HAProxy(workdir, [r.port for r in started])
        partial.lb.wait(lambda s: list(s.values()) == ["UP"] * 3, "three replicas UP")
        yield partial
    finally:
        if partial.lb is not None:
            partial.lb.stop()
        for replica in partial.replicas:
            replica.stop()


def _archive(offset: int) -> str:
    def shifted(x: list[float], y: list[float]) -> list[float]:
        return [a + b + offset for a, b in zip(x, y, strict=True)]

    return base64.b64encode(cloudpickle.dumps(shifted)).decode("ascii")


def _deploy(base: str, name: str, offset: int, new: bool) -> requests.Response:
    body: dict[str, Any] = {
        "name": name, "type": "model", "description": f"adds, plus {offset}",
        "archive": _archive(offset), "python_version": platform.python_version(),
    }  # fmt: skip
    if new:
        return requests.post(f"{base}/endpoints", json=body, auth=ADMIN, timeout=60)
    body["should_update_version"] = True
    return requests.put(f"{base}/endpoints/{name}", json=body, auth=ADMIN, timeout=60)


def _deploy_quietly(base: str, name: str) -> None:
    """A deploy with an 8 MB archive, to a replica that is about to be killed."""
    blob = os.urandom(8_000_000)

    def big(x: list[float], y: list[float]) -> int:
        return len(blob)

    body = {
        "name": name, "type": "model", "python_version": platform.python_version(),
        "archive": base64.b64encode(cloudpickle.dumps(big)).decode("ascii"),
    }  # fmt: skip
    try:
        requests.post(f"{base}/endpoints", json=body, auth=ADMIN, timeout=60)
    except requests.RequestException:
        pass  # the replica died under it: expected


def _version(base: str, name: str) -> int | None:
    response = requests.get(f"{base}/endpoints/{name}", auth=ADMIN, timeout=5)
    return int(response.json()["version"]) if response.status_code == 200 else None


def _query(base: str, name: str, auth: tuple[str, str] = QUERY_USER) -> requests.Response:
    return requests.post(
        f"{base}/query/{name}", json={"data": {"x": [1, 2], "y": [3, 4]}}, auth=auth, timeout=30
    )


def _visible_after(cluster: Cluster, name: str, version: int, replicas: list[Server]) -> float:
    """Seconds until every one of ``replicas`` reports ``name`` at ``version``."""
    started = time.monotonic()
    pending = list(replicas)
    while pending:
        pending = [r for r in pending if _version(r.url, name) != version]
        if time.monotonic() - started > 10:
            raise AssertionError(f"{name} v{version} not served by {[r.url for r in pending]}")
        if pending:
            time.sleep(0.005)
    return time.monotonic() - started


class Load:
    """LOAD_THREADS clients querying through the load balancer, each one request at a time,
    until stopped (bounded by a deadline too)."""

    def __init__(self, url: str, name: str, seconds: float) -> None:
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(url, name)) for _ in range(LOAD_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, name: str) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                response = _query(url, name)
                good = response.status_code == 200
                what = f"{response.status_code} {response.text[:120]}"
            except requests.RequestException as exc:
                good, what = False, type(exc).__name__
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed.append(what)

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self


def test_replicas_share_one_store(cluster: Cluster) -> None:
    lb = cluster.lb.url
    first, second, third = cluster.replicas

    # 1. TabPy's own client, unmodified, deploys through the load balancer.
    def add(x: list[float], y: list[float]) -> list[float]:  # local: pickled by value
        return [a + b for a, b in zip(x, y, strict=True)]

    client = Client(lb + "/")
    client.set_credentials(*ADMIN)
    client.deploy("add", add, "Adds two lists")
    cluster.versions["add"] = 1
    _visible_after(cluster, "add", 1, cluster.replicas)
    for replica in cluster.replicas:  # every replica answers, directly
        response = _query(replica.url, "add")
        assert response.status_code == 200, response.text
        assert response.json()["response"] == [4, 6]
    assert client.query("add", [1, 2], [3, 4])["response"] == [4, 6]

    # 2. Propagation: a deploy through one replica, served by the two others.
    delays = []
    for round_ in range(6):
        via, others = cluster.replicas[round_ % 3], cluster.replicas[:]
        others.remove(via)
        response = _deploy(via.url, "shift", round_, new=round_ == 0)
        assert response.status_code in (200, 201), response.text
        version = round_ + 1
        delays.append(_visible_after(cluster, "shift", version, others))
        assert _query(others[0].url, "shift").json()["response"] == [4 + round_, 6 + round_]
    cluster.versions["shift"] = 6
    print(
        f"\npropagation to the other replicas: median {statistics.median(delays) * 1000:.0f} ms,"
        f" max {max(delays) * 1000:.0f} ms over {len(delays)} deploys"
    )
    assert max(delays) < 1.0

    # 3. The same name deployed through two replicas at once: consecutive versions.
    results: dict[int, requests.Response] = {}

    def update(i: int, replica: Server) -> None:
        results[i] = _deploy(replica.url, "shift", 100 + i, new=False)

    threads = [threading.Thread(target=update, args=(i, r)) for i, r in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = sorted(int(r.json()["shift"]["version"]) for r in results.values())
    assert got == [7, 8], [r.text for r in results.values()]
    cluster.versions["shift"] = 8
    _visible_after(cluster, "shift", 8, cluster.replicas)

    # 4. SIGKILL one replica under a steady, bounded load through the load balancer, while
    # it is taking a large deploy.
    load = Load(lb, "add", seconds=30)
    time.sleep(1.5)
    before = load.ok
    big = threading.Thread(target=_deploy_quietly, args=(third.url, "big"))
    big.start()
    time.sleep(0.3)  # the body is on its way or being stored
    os.kill(third.process.pid, signal.SIGKILL)
    third.process.wait()
    killed_at = time.monotonic()
    cluster.lb.wait(lambda s: s.get("replica3") != "UP", "the killed replica to be DOWN")
    down_after = time.monotonic() - killed_at
    time.sleep(1.5)
    load.stop()
    big.join()
    with psycopg.connect(cluster.url) as conn:
        row = conn.execute(
            "SELECT e.version, a.sha256 = encode(sha256(a.data), 'hex') FROM endpoints e "
            "JOIN archives a ON a.name = e.name AND a.version = e.version WHERE e.name = 'big'"
        ).fetchone()
        listed = conn.execute("SELECT count(*) FROM endpoints WHERE name = 'big'").fetchone()
    # Either the deploy happened (row and its intact archive) or it did not (neither).
    assert listed is not None and (listed[0] == 0 if row is None else row == (1, True))
    if row is not None:
        cluster.versions["big"] = 1
    print(f"replica killed during a deploy: the deploy {'happened' if row else 'did not happen'}")
    print(
        f"SIGKILL of one replica under load: {load.ok} requests answered ({before} before the "
        f"kill), {len(load.failed)} failed {load.failed[:4]}; HAProxy marked it down after "
        f"{down_after:.1f} s"
    )
    # Only requests in flight on the killed replica may fail: at most one per client thread.
    assert len(load.failed) <= LOAD_THREADS
    assert load.ok > before
    cluster.replicas.remove(third)

    # 5. PostgreSQL restarts under load: queries go on, deploys wait, nothing is lost.
    load = Load(lb, "add", seconds=60)
    time.sleep(1.0)
    cluster.postgres.stop()
    stopped_at = time.monotonic()
    time.sleep(1.0)
    refused = _deploy(lb, "during_outage", 0, new=True)
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("Retry-After")
    ready = requests.get(f"{first.url}/health/ready", timeout=5).json()
    store_check = next(c for c in ready["checks"] if c["name"] == "store")
    assert "unreachable" in store_check["detail"]
    served_while_down = _query(second.url, "shift")
    assert served_while_down.status_code == 200
    cluster.postgres.start()
    outage = time.monotonic() - stopped_at
    # The first deploy after the restart may still meet a replica reconnecting: follow
    # Retry-After as a client should, within a bound.
    deadline = time.monotonic() + 30
    while True:
        response = _deploy(lb, "after_outage", 7, new=True)
        if response.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(float(response.headers.get("Retry-After", "1")) / 5)
    assert response.status_code == 201, response.text
    cluster.versions["after_outage"] = 1
    recovered = _visible_after(cluster, "after_outage", 1, cluster.replicas)
    load.stop()
    print(
        f"PostgreSQL down for {outage:.1f} s under load: {load.ok} queries answered, "
        f"{len(load.failed)} failed {load.failed[:4]}; a deploy during the outage got 503; "
        f"after the restart a deploy reached both replicas in {recovered * 1000:.0f} ms"
    )
    assert load.failed == []

    # 6. Nothing lost: the database, every live replica and a replica started afresh agree.
    with psycopg.connect(cluster.url) as conn:
        stored = dict(conn.execute("SELECT name, version FROM endpoints").fetchall())
        users = {row[0] for row in conn.execute("SELECT name FROM users")}
    assert stored == cluster.versions, (stored, cluster.versions)
    assert users == {ADMIN[0], QUERY_USER[0]}
    fresh = cluster.start_replica(4) if (cluster.workdir / "replica4").mkdir() is None else None
    assert fresh is not None
    cluster.replicas.append(fresh)
    for replica in cluster.replicas:
        served = requests.get(f"{replica.url}/endpoints", auth=ADMIN, timeout=5).json()
        assert {n: e["version"] for n, e in served.items()} == cluster.versions, replica.url
    assert _query(fresh.url, "shift").status_code == 200
    print(
        f"after everything: {len(stored)} endpoints at versions {stored}, {len(users)} users, "
        f"the same in PostgreSQL and on {len(cluster.replicas)} replicas: 0 lost"
    )
