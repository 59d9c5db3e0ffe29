"""The result cache (max_age), over HTTP: hits answer without a worker (the in-process pool
records every job it is given), a redeploy never answers an old version's result (in both
store backends), defaults, merging of identical running calls, eviction and the metrics."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import requests
from pg import PostgresServer

from helpers import AppFactory, InProcessServer, ServerFactory
from tabserve.cli import main
from tabserve.server.cache import mentions_max_age

SCRIPT = "return [x + 1 for x in _arg1]"


def runs(app: InProcessServer) -> int:
    """Jobs the pool has been given so far."""
    return len(app.executor.jobs)


def archive(function: Callable[..., Any]) -> str:
    return base64.b64encode(cloudpickle.dumps(function)).decode()


def models() -> tuple[Callable[..., Any], Callable[..., Any]]:
    def first(x: list[int]) -> str:  # nested: pickled by value
        return "version one"

    def second(x: list[int]) -> str:
        return "version two"

    return first, second


@pytest.fixture(scope="module")
def cache_app(app_factory: AppFactory) -> InProcessServer:
    return app_factory()


def test_without_max_age_nothing_is_cached(cache_app: InProcessServer) -> None:
    body = {"script": SCRIPT, "data": {"_arg1": [1, 2]}}
    before = runs(cache_app)
    for _ in range(2):
        answer = cache_app.post("/evaluate", json=body)
        assert (answer.status_code, answer.text) == (200, "[2,3]")
        assert "Age" not in answer.headers
    assert runs(cache_app) == before + 2


def test_a_hit_answers_from_memory_with_an_age(cache_app: InProcessServer) -> None:
    hits = cache_app.metric("tabserve_cache_hits_total")
    before = runs(cache_app)
    first = cache_app.post(
        "/evaluate", json={"script": SCRIPT, "data": {"_arg1": [5, 6]}, "max_age": 60}
    )
    assert first.status_code == 200 and "Age" not in first.headers
    # The same input, other key order and spacing: the canonical hash is the same.
    again = cache_app.post(
        "/evaluate",
        data=b'{"max_age": 30,  "data": {"_arg1": [5,6]}, "script": "' + SCRIPT.encode() + b'"}',
    )
    assert again.status_code == 200, again.text
    assert again.text == first.text == "[6,7]"
    assert int(again.headers["Age"]) >= 0
    assert runs(cache_app) == before + 1
    assert cache_app.metric("tabserve_cache_hits_total") == hits + 1
    # The header says the same; 0 always runs.
    header = cache_app.post(
        "/evaluate",
        json={"script": SCRIPT, "data": {"_arg1": [5, 6]}},
        headers={"Cache-Control": "no-transform, max-age=60"},
    )
    assert "Age" in header.headers and runs(cache_app) == before + 1
    fresh = cache_app.post(
        "/evaluate", json={"script": SCRIPT, "data": {"_arg1": [5, 6]}, "max_age": 0}
    )
    assert "Age" not in fresh.headers and runs(cache_app) == before + 2
    # Other data or another script: a miss.
    other = cache_app.post(
        "/evaluate", json={"script": SCRIPT, "data": {"_arg1": [5, 7]}, "max_age": 60}
    )
    assert other.text == "[6,8]" and runs(cache_app) == before + 3


def test_a_bad_max_age_is_a_400(cache_app: InProcessServer) -> None:
    for value in (-1, "60", 1.5, True, None, [1]):
        answer = cache_app.post(
            "/evaluate", json={"script": SCRIPT, "data": {"_arg1": [1]}, "max_age": value}
        )
        assert answer.status_code == 400, (value, answer.text)
        assert answer.json()["message"] == "max_age must be a non-negative integer"
    for header in ("max-age=soon", "max-age=-5", "max-age="):
        answer = cache_app.post(
            "/evaluate",
            json={"script": SCRIPT, "data": {"_arg1": [1]}},
            headers={"Cache-Control": header},
        )
        assert answer.status_code == 400, header


def test_a_huge_cache_control_max_age_counts_as_two_to_the_31(cache_app: InProcessServer) -> None:
    body = {"script": "return 40 + 3", "data": {}}
    for digits in ("9" * 11, "9" * 5000):  # over 4,300 digits int() itself refuses
        answer = cache_app.post(
            "/evaluate", json=body, headers={"Cache-Control": f"max-age={digits}"}
        )
        assert (answer.status_code, answer.text) == (200, "43")
    # The second call was a hit on the first's result: any age up to 2^31 s is accepted.
    assert "Age" in answer.headers


def test_async_calls_with_a_fresh_result_get_it_at_once(cache_app: InProcessServer) -> None:
    body = {"script": "return 41 + 1", "data": {}, "max_age": 60}
    cache_app.post("/evaluate", json=body)
    answer = cache_app.post("/evaluate", json=body, headers={"Prefer": "respond-async"})
    assert (answer.status_code, answer.text) == (200, "42")
    assert "Age" in answer.headers


def test_the_evaluate_default_max_age(app_factory: AppFactory) -> None:
    app = app_factory(TABSERVE_EVALUATE_MAX_AGE="60")
    body = {"script": "return 3", "data": {}}
    assert "Age" not in app.post("/evaluate", json=body).headers
    assert "Age" in app.post("/evaluate", json=body).headers
    assert runs(app) == 1


@pytest.fixture(params=["statedir", "postgresql"])
def store_app(
    request: pytest.FixtureRequest, app_factory: AppFactory, tmp_path: Path
) -> Iterator[InProcessServer]:
    if request.param == "statedir":
        yield app_factory(workdir=tmp_path)
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        url = pg.fresh_database(f"cache_{tmp_path.name[-12:].lower()}")
        yield app_factory(workdir=tmp_path, TABSERVE_STORE=url)


def test_a_redeploy_never_answers_a_stale_result(store_app: InProcessServer) -> None:
    app = store_app
    first, second = models()
    body = {"name": "m", "type": "model", "archive": archive(first)}
    deployed = app.post("/endpoints", json=body)
    assert deployed.status_code == 201, deployed.text
    call = {"data": {"x": [1]}, "max_age": 3600}
    assert app.post("/query/m", json=call).json()["response"] == "version one"
    hit = app.post("/query/m", json=call)
    assert hit.json()["response"] == "version one" and "Age" in hit.headers
    update = {"archive": archive(second), "should_update_version": True, "type": "model"}
    assert app.request("PUT", "/endpoints/m", json=update).status_code == 200
    after = app.post("/query/m", json=call)
    assert after.json() == {**after.json(), "response": "version two", "version": 2}
    assert "Age" not in after.headers


def test_an_endpoint_default_max_age_is_a_deploy_option(store_app: InProcessServer) -> None:
    app = store_app
    first, _ = models()
    body = {"name": "d", "type": "model", "archive": archive(first), "max_age": 60}
    assert app.post("/endpoints", json=body).status_code == 201
    assert app.get("/endpoints/d").json()["max_age"] == 60
    before = runs(app)
    assert "Age" not in app.post("/query/d", json={"data": {"x": [1]}}).headers
    assert "Age" in app.post("/query/d", json={"data": {"x": [1]}}).headers
    assert "Age" not in app.post("/query/d", json={"data": {"x": [1]}, "max_age": 0}).headers
    assert runs(app) == before + 2
    bad = app.request("PUT", "/endpoints/d", json={"max_age": -1})
    assert bad.status_code == 400


def test_identical_running_calls_are_merged_and_the_cache_is_bounded(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(TABSERVE_CACHE_MAX_MB="1", TABSERVE_WORKERS="2")
    body = {"script": "import time\ntime.sleep(1.5)\nreturn 'slow'", "data": {}, "max_age": 60}
    answers: list[requests.Response] = []

    def call() -> None:
        answers.append(server.post("/evaluate", json=body))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.text for a in answers] == ['"slow"', '"slow"']
    assert server.metric("tabserve_cache_merges_total") == 1
    assert server.metric("tabserve_cache_misses_total") == 2
    # Three answers of 400 kB in 1 MiB: the least recently used goes.
    for n in range(3):
        big = {"script": f"return 'x' * 400000 + '{n}'", "data": {}, "max_age": 60}
        assert server.post("/evaluate", json=big).status_code == 200
    assert server.metric("tabserve_cache_evictions_total") >= 1
    assert server.metric("tabserve_cache_bytes") <= 1024 * 1024


def test_a_cached_result_is_never_a_way_around_authorization(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    state = str(tmp_path / "state")
    for name, permissions in (("admin", "all"), ("reader", "query"), ("scorer", "evaluate")):
        assert main(["user", "add", "-u", name, "-p", f"{name}-pass-1", "--permissions",
                     permissions, "--store", state]) == 0  # fmt: skip
    admin, reader, scorer = (("admin", "admin-pass-1"), ("reader", "reader-pass-1"),
                             ("scorer", "scorer-pass-1"))  # fmt: skip
    app = app_factory(workdir=tmp_path, auth=admin, TABSERVE_USERS="store")
    body = {"script": "return 99", "data": {}, "max_age": 60}
    assert app.post("/evaluate", json=body).text == "99"
    assert "Age" in app.post("/evaluate", json=body).headers
    # Without the evaluate permission, the cached answer is refused like a fresh call.
    assert app.post("/evaluate", json=body, auth=reader).status_code == 403
    # Other permissions, another key: this caller's call runs.
    before = runs(app)
    answer = app.post("/evaluate", json=body, auth=scorer)
    assert answer.text == "99" and "Age" not in answer.headers
    assert runs(app) == before + 1


def test_a_large_body_gives_its_max_age_before_or_after_its_data(
    cache_app: InProcessServer,
) -> None:
    rows = list(range(40_000))  # about 240 kB of JSON
    before = runs(cache_app)
    for order in ("after", "before", "after"):
        data = {"_arg1": rows}
        body = ({"script": "return len(_arg1)", "data": data, "max_age": 60} if order == "after"
                else {"max_age": 60, "script": "return len(_arg1)", "data": data})  # fmt: skip
        answer = cache_app.post("/evaluate", json=body)
        assert answer.text == "40000"
    assert runs(cache_app) == before + 1  # the two later calls were hits


def test_max_age_is_found_across_the_chunks_a_body_arrived_in() -> None:
    marker = b'"max_age":60'
    filler = b" " * 200_000  # past both scan windows
    # Small body, the marker split between two chunks.
    assert mentions_max_age([b'{"script":"1","max_', b'age":60}'])
    # Large body: split across chunks within the last window, and within the first.
    assert mentions_max_age([b"{", filler, b'"max_', b'age":60}'])
    assert mentions_max_age([b'{"max', b'_age":60,', filler, b"}"])
    # Only the two ends are looked at: a marker in the middle of a large body is not.
    assert not mentions_max_age([b"{", filler, marker, filler, b"}"])
    assert not mentions_max_age([b'{"script":"1"}'])
