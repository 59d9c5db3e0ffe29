"""A full disk: the state directory on a small tmpfs, filled up while the server runs.

Changes fail with a clear 507, everything stored before is untouched and keeps answering,
nothing half-written is left, and the server keeps serving; once space is freed, deploys
work again. Needs root for the mount (CI runs as root).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from helpers import Server, ServerFactory

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.fault]


def tagged(tag: str, padding: int = 0):  # type: ignore[no-untyped-def]
    ballast = os.urandom(padding)  # incompressible bytes carried in the pickle

    def answer() -> list[object]:
        return [tag, len(ballast)]

    return answer


def body(name: str, tag: str, padding: int = 0) -> dict[str, object]:
    return {
        "name": name,
        "type": "model",
        "description": tag,
        "archive": base64.b64encode(cloudpickle.dumps(tagged(tag, padding))).decode(),
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write until the file system says ENOSPC, down to the last block; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def snapshot(state: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(state)): path.read_bytes()
        for path in sorted(state.rglob("*"))
        # SQLite's own -wal and -shm files come and go with its connections.
        if path.is_file() and path.name != "filler" and not path.name.endswith(("-wal", "-shm"))
    }


def test_full_disk_is_a_clear_507_and_loses_nothing(
    server_factory: ServerFactory, small_disk: Path
) -> None:
    server: Server = server_factory(TABPY_STATE_PATH=str(small_disk))
    assert server.post("/endpoints", json=body("kept", "v1")).status_code in (200, 201)
    assert server.post("/query/kept", json={"data": {}}).json()["response"] == ["v1", 0]
    before = snapshot(small_disk)
    filler = fill(small_disk)
    counts: Counter[str] = Counter()

    override = {**body("kept", "v2"), "should_update_version": True}
    attempts = [
        ("deploy", "POST", "/endpoints", body("big", "new", padding=200_000)),
        ("deploy small", "POST", "/endpoints", body("tiny", "new")),
        ("override", "PUT", "/endpoints/kept", override),
        ("metadata update", "PUT", "/endpoints/kept", {"description": "changed"}),
        ("delete", "DELETE", "/endpoints/kept", None),
    ]  # fmt: skip
    for what, method, path, payload in attempts:
        response = server.request(method, path, json=payload)
        counts[f"{what}: {response.status_code}"] += 1
        assert response.status_code == 507, (what, response.status_code, response.text)
        error = response.json()
        assert error["message"] == "Not enough space to store the change"
        assert "No space left on device" in error["info"]
        # The server keeps serving, and what was stored answers as before.
        assert server.get("/info").status_code == 200
        assert server.evaluate("return [x + 1 for x in _arg1]", _arg1=[1]).json() == [2]
        assert server.post("/query/kept", json={"data": {}}).json()["response"] == ["v1", 0]
    assert snapshot(small_disk) == before  # nothing damaged, nothing half-written left
    assert set(server.get("/endpoints").json()) == {"kept"}
    assert "cannot deploy big" in server.log()

    filler.unlink()
    response = server.post("/endpoints", json=body("big", "new", padding=200_000))
    assert response.status_code in (200, 201), response.text
    counts[f"deploy after freeing space: {response.status_code}"] += 1
    assert server.post("/query/big", json={"data": {}}).json()["response"] == ["new", 200_000]
    print("\n" + "\n".join(f"  {key}: {value}" for key, value in sorted(counts.items())))


def test_a_restart_on_a_full_disk_stops_with_one_line_and_loses_nothing(
    server_factory: ServerFactory, small_disk: Path
) -> None:
    # tabserve.db (SQLite in WAL mode) needs room for its -shm file even to be read, so a
    # start on a full state directory cannot serve: it stops with one line, not a traceback,
    # and once space is freed the next start serves everything that was stored.
    server = server_factory(TABPY_STATE_PATH=str(small_disk))
    assert server.post("/endpoints", json=body("kept", "v1")).status_code in (200, 201)
    server.stop()
    before = snapshot(small_disk)
    filler = fill(small_disk)
    with pytest.raises(RuntimeError, match="exited early") as failure:
        server_factory(TABPY_STATE_PATH=str(small_disk), workdir=server.workdir)
    log = str(failure.value)
    assert "tabserve: cannot start: The store is unavailable" in log
    assert "disk full or read-only" in log
    assert "Traceback" not in log
    filler.unlink()
    assert snapshot(small_disk) == before
    again = server_factory(TABPY_STATE_PATH=str(small_disk), workdir=server.workdir)
    assert again.post("/query/kept", json={"data": {}}).json()["response"] == ["v1", 0]
