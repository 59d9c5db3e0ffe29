"""The store under faults: writers killed with SIGKILL mid-change, several writer processes
on one state directory, and PostgreSQL restarting under a listening replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pg import PostgresServer

from tabserve.store.backends import open_store
from tabserve.store.state_dir import ensure_state_dir

# A writer that bumps endpoint "m" forever, each version with a 2 MB archive that names its
# version, and prints each version once committed.
_WRITER = """
import sys
from pathlib import Path
from tabserve.store.backends import EndpointRecord, open_store
store = open_store(sys.argv[1], cache=Path(sys.argv[2]))
store.migrate()
for _ in range(int(sys.argv[3])):
    with store.change() as change:
        old = change.endpoints.get("m")
        version = old.version + 1 if old else 1
        change.put(EndpointRecord(name="m", type="model", version=version),
                   archive=b"v%d:" % version + b"x" * 2_000_000)
    print(version, flush=True)
"""


def _writer(location: str, cache: Path, count: int = 10**6) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, location, str(cache), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _collect(writer: subprocess.Popen[str], seen: list[int]) -> None:
    assert writer.stdout is not None
    seen.extend(int(line) for line in writer.stdout)


def _location(kind: str, tmp_path: Path, postgres: PostgresServer) -> str:
    if kind == "statedir":
        ensure_state_dir(tmp_path / "state")
        location = str(tmp_path / "state")
    else:
        location = postgres.fresh_database(f"faults_{tmp_path.name[-20:].lower()}")
    store = open_store(location, cache=tmp_path / "cache")
    store.migrate()
    store.close()
    return location


def _check_consistent(location: str, cache: Path) -> int:
    store = open_store(location, cache=cache)
    try:
        endpoint = store.snapshot().endpoints.get("m")
        if endpoint is None:
            return 0  # killed before its first commit
        archive = store.archive("m", endpoint.version)
        assert archive is not None, f"version {endpoint.version} has no archive"
        assert archive.startswith(b"v%d:" % endpoint.version)
        assert len(archive) == 2_000_002 + len(str(endpoint.version))
        assert store.materialize({"m": endpoint}) == []
        return endpoint.version
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["statedir", "postgresql"])
def test_sigkill_during_changes_leaves_the_store_consistent(
    kind: str, tmp_path: Path, postgres: PostgresServer
) -> None:
    location = _location(kind, tmp_path, postgres)
    committed = 0
    kills = 0
    for delay in (0.0, 0.05, 0.13, 0.21, 0.34):
        writer = _writer(location, tmp_path / "cache")
        seen: list[int] = []
        reader = threading.Thread(target=_collect, args=(writer, seen))
        reader.start()
        deadline = time.monotonic() + 60
        while not seen and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # started and committed once: the kill lands mid-stream
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        reader.join()
        kills += 1
        version = _check_consistent(location, tmp_path / "check")
        # What was reported committed is there; at most the one in flight also landed.
        last = seen[-1] if seen else committed
        assert version in (last, last + 1), (version, last)
        committed = version
    print(f"\n{kind}: {kills} writers killed mid-change, final version {committed}")
    assert committed >= 3  # the writers did get work done between the kills


def test_writer_processes_on_one_state_directory_get_consecutive_versions(
    tmp_path: Path,
) -> None:
    ensure_state_dir(tmp_path / "state")
    location = str(tmp_path / "state")
    writers = [_writer(location, tmp_path / "cache", count=6) for _ in range(3)]
    versions: list[int] = []
    for writer in writers:
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0
        versions.extend(int(x) for x in out.split())
    assert sorted(versions) == list(range(1, 19))
    assert _check_consistent(location, tmp_path / "check") == 18


def test_the_listener_resyncs_after_postgresql_restarts(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.fresh_database("restart")
    store = open_store(url, cache=tmp_path / "cache")
    store.migrate()
    heard = threading.Event()
    store.watch(heard.set)
    try:
        assert heard.wait(5)
        assert store.health()[0]
        postgres.stop()
        _wait(lambda: not store.health()[0], "the store to be reported down")
        assert "unreachable" in store.health()[1]
        # A change made while the listener is away is not notified to it ...
        postgres.start()
        writer = open_store(url, cache=tmp_path / "w")
        heard.clear()
        with writer.change() as change:
            from tabserve.store.backends import EndpointRecord

            change.put(EndpointRecord(name="late", type="model"), archive=b"x")
        writer.close()
        # ... yet it is seen, by the resync after the reconnect (or the notification).
        assert heard.wait(15), "the change made around the restart was never seen"
        _wait(lambda: store.health()[0], "the store to be reported up again")
        assert store.token() == store.generation()
    finally:
        store.close()
        postgres.wait_ready()


def _wait(condition, what: str, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_while_holding_the_state_lock_does_not_block_the_next_writer(
    tmp_path: Path,
) -> None:
    """flock is released by the kernel when its holder dies: no stale lock file to clean."""
    ensure_state_dir(tmp_path / "state")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from tabserve.store.backends import open_store\n"
         "s = open_store(Path(sys.argv[1]))\n"
         "with s.locked():\n print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "state")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    store = open_store(tmp_path / "state")
    with store.change() as change:
        from tabserve.store.backends import EndpointRecord

        change.put(EndpointRecord(name="after", type="model"), archive=b"x")
    assert "after" in store.snapshot().endpoints
    store.close()
