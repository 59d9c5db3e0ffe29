"""The worker's job handling on its own, in this process (no pipes, no pool)."""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import orjson
import pytest

import tabserve.worker.main as worker_module
from tabserve.protocol import Context, JobKind
from tabserve.worker.main import Worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def triple(x: int) -> int:
    return 3 * x


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    for version in (1, 2):
        archive = tmp_path / str(version) / "pickle_archive"
        archive.parent.mkdir()
        archive.write_bytes(cloudpickle.dumps(triple))
    return Worker({"request_limit": 1 << 20})


def table(tmp_path: Path, version: int) -> dict[str, object]:
    path = str(tmp_path / str(version) / "pickle_archive")
    return {"endpoints": {"t": {"model": "t", "version": version, "path": path}}}


def query(worker: Worker, context: Context | None = None) -> dict[str, object]:
    if context is not None:
        worker.set_context(context)  # what a context frame before the job does
    reply, body = worker.handle({"kind": JobKind.QUERY, "name": "t"}, b'{"data": [2]}')
    assert reply["status"] == 200, reply
    return orjson.loads(body)


def test_each_version_is_loaded_once(
    worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    real = worker_module.load_archive

    def counting(path: Path) -> object:
        loads.append(path)
        return real(path)

    monkeypatch.setattr(worker_module, "load_archive", counting)
    assert query(worker, table(tmp_path, 1))["response"] == 6
    assert query(worker)["version"] == 1
    assert len(loads) == 1
    assert query(worker, table(tmp_path, 2))["version"] == 2
    assert query(worker)["version"] == 2
    assert len(loads) == 2


def test_removed_endpoint_stops_answering_and_is_unloaded(worker: Worker, tmp_path: Path) -> None:
    query(worker, table(tmp_path, 1))
    worker.set_context({"endpoints": {}})
    reply, _ = worker.handle({"kind": JobKind.QUERY, "name": "t"}, b'{"data": [2]}')
    assert reply["status"] == 404
    assert worker._loaded == {}


def test_pathological_input_is_answered_and_keeps_the_worker() -> None:
    worker = Worker({"request_limit": 10 << 20})
    deep = b'{"script": "return 1", "data": {"_arg1": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    reply, _ = worker.handle({"kind": "evaluate"}, deep)
    assert reply["status"] == 400 and reply["message"] == "Request body is not valid JSON"
    long_sum = orjson.dumps({"script": "return " + "+".join(["1"] * 200_000), "data": {}})
    reply, _ = worker.handle({"kind": "evaluate"}, long_sum)
    assert reply["status"] == 500
    assert "nested too deeply" in reply["info"]
    reply, body = worker.handle({"kind": "evaluate"}, b'{"script": "return 2", "data": {}}')
    assert reply["status"] == 200 and body == b"2"
