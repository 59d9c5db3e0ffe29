"""tabserve.Server's jobs, results and keys against a real tabserve (users in the store, so
keys can be made): wait_for_job on success, failure, cancel and timeout; downloads as CSV
and JSON; user and endpoint keys."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
import requests

import tabserve
from helpers import Server, ServerFactory
from tabserve import (
    APIKeyAuth,
    BasicAuth,
    Forbidden,
    JobCancelled,
    JobFailed,
    JobItem,
    JobStatus,
    KeyItem,
    NotFound,
    Pager,
    PublishMode,
    RequestOptions,
    ResultItem,
    ScriptError,
    Unauthorized,
)
from tabserve.cli import main

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ADMIN = ("admin", "admin-pass-1")


def add(x: list[float], y: list[float]) -> list[float]:
    return [a + b for a, b in zip(x, y, strict=True)]


def table(n: int) -> dict[str, list[object]]:
    return {"n": list(range(n)), "label": [f"row, {i}" for i in range(n)]}


def fails(x: float) -> float:
    raise ValueError(f"x must not be {x}")


def sleepy(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def served(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    workdir = tmp_path_factory.mktemp("jobs-client")
    location = str(workdir / "state")
    assert main(["user", "add", "-u", ADMIN[0], "-p", ADMIN[1], "--store", location]) == 0
    # Three workers: jobs never take the last one, so two may run jobs at once.
    return server_factory(
        workdir=workdir,
        TABSERVE_USERS="store",
        TABPY_STATE_PATH=location,
        TABSERVE_WORKERS="3",
    )


@pytest.fixture(scope="module")
def admin(served: Server) -> Iterator[tabserve.Server]:
    server = tabserve.Server(served.url, timeout=30)
    with server.auth.sign_in(BasicAuth(*ADMIN)):
        for name, func in (("add", add), ("table", table), ("fails", fails), ("sleepy", sleepy)):
            server.endpoints.publish(name, func, mode=PublishMode.Overwrite)
        yield server


def _until(check: Callable[[], bool], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the liveness bound"
        time.sleep(0.05)


def test_wait_for_job_returns_the_succeeded_job_and_its_result(admin: tabserve.Server) -> None:
    job = admin.endpoints.submit("add", [1, 2], [3, 4])
    assert isinstance(job, JobItem) and job.status in (JobStatus.PENDING, JobStatus.STARTED)
    done = admin.jobs.wait_for_job(job, timeout=60)
    assert done.status is JobStatus.SUCCESS and done.finished
    assert done.query_result_id is not None and done.error is None
    assert admin.jobs.get_by_id(job.id) == done
    result = admin.results.get_by_id(done.query_result_id)
    assert isinstance(result, ResultItem)
    assert (result.data, result.endpoint, result.version) == ([4, 6], "add", 1)
    # By id as well as by item.
    assert admin.jobs.wait_for_job(job.id).query_result_id == done.query_result_id


def test_download_as_csv_and_json(admin: tabserve.Server, tmp_path: Path) -> None:
    job = admin.jobs.wait_for_job(admin.endpoints.submit("table", 3), timeout=60)
    assert job.query_result_id is not None
    written = admin.results.download(job.query_result_id, tmp_path / "t.csv", filetype="csv")
    assert written == tmp_path / "t.csv"
    rows = list(csv.reader(io.StringIO(written.read_text(encoding="utf-8"))))
    assert rows == [["n", "label"], ["0", "row, 0"], ["1", "row, 1"], ["2", "row, 2"]]
    as_json = admin.results.download(job.query_result_id, tmp_path / "t.json", filetype="json")
    assert json.loads(as_json.read_text()) == table(3)
    # A list is one column.
    listed = admin.jobs.wait_for_job(admin.endpoints.submit("add", [1], [2]), timeout=60)
    assert listed.query_result_id is not None
    one = admin.results.download(listed.query_result_id, tmp_path / "a.csv")
    assert list(csv.reader(io.StringIO(one.read_text()))) == [["value"], ["3"]]
    with pytest.raises(NotFound):
        admin.results.download("no-such-result", tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wait_for_job_raises_job_failed_with_the_servers_message(admin: tabserve.Server) -> None:
    with pytest.raises(ScriptError) as synchronous:
        admin.endpoints.query("fails", 7)
    job = admin.endpoints.submit("fails", 7)
    with pytest.raises(JobFailed) as caught:
        admin.jobs.wait_for_job(job, timeout=60)
    assert caught.value.message == synchronous.value.message
    assert "x must not be 7" in str(caught.value.info)
    assert caught.value.job.status is JobStatus.FAILURE
    assert isinstance(caught.value, tabserve.TabserveError)


def test_wait_for_job_raises_job_cancelled(admin: tabserve.Server) -> None:
    job = admin.endpoints.submit("sleepy", 60)
    _until(lambda: admin.jobs.get_by_id(job.id).status is JobStatus.STARTED)
    admin.jobs.cancel(job)
    with pytest.raises(JobCancelled) as caught:
        admin.jobs.wait_for_job(job.id, timeout=60)
    assert caught.value.job.status is JobStatus.CANCELLED


def test_wait_for_job_times_out_and_the_job_goes_on(admin: tabserve.Server) -> None:
    job = admin.endpoints.submit("sleepy", 60)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=job.id):
        admin.jobs.wait_for_job(job, timeout=0.5)
    assert time.monotonic() - started < 30  # a liveness bound, not a timing target
    assert not admin.jobs.get_by_id(job.id).finished
    admin.jobs.cancel(job.id)
    with pytest.raises(JobCancelled):
        admin.jobs.wait_for_job(job, timeout=60)


def test_keys_create_sign_in_and_revoke(admin: tabserve.Server, served: Server) -> None:
    item, secret = admin.keys.create(user="admin")
    assert isinstance(item, KeyItem) and item.kind == "user" and item.user == "admin"
    assert secret and secret not in repr(item)
    keyed = tabserve.Server(served.url, timeout=30)
    with keyed.auth.sign_in(APIKeyAuth(secret)):
        assert keyed.endpoints.get_by_name("add").name == "add"  # the user's own rights
    listed, pagination = admin.keys.get()
    assert item.id in {key.id for key in listed} and pagination.total_available >= 1
    admin.keys.revoke(item)
    assert next(k for k in admin.keys.get()[0] if k.id == item.id).revoked

    def refused() -> bool:
        try:
            keyed.auth.sign_in(APIKeyAuth(secret))
        except Unauthorized:
            return True
        keyed.auth.sign_out()
        return False

    _until(refused, within=10)


def test_an_endpoint_key_reaches_its_endpoint_and_its_own_jobs_only(
    admin: tabserve.Server, served: Server, tmp_path: Path
) -> None:
    item, secret = admin.keys.create(endpoint="add")
    assert (item.kind, item.endpoint) == ("endpoint", "add")
    keyed = tabserve.Server(served.url, timeout=30)
    with keyed.auth.sign_in(APIKeyAuth(secret)):  # /info is not its, but it is signed in
        assert keyed.endpoints.query("add", [1], [1]) == [2]
        job = keyed.jobs.wait_for_job(keyed.endpoints.submit("add", [2], [2]), timeout=60)
        assert job.query_result_id is not None
        assert keyed.results.get_by_id(job.query_result_id).data == [4]
        keyed.results.download(job.query_result_id, tmp_path / "k.csv")
        assert (tmp_path / "k.csv").read_text().splitlines() == ["value", "4"]
        with pytest.raises(Forbidden):
            keyed.endpoints.query("table", 1)
        with pytest.raises(Forbidden):
            keyed.endpoints.get()
        # Another caller's job is not its to see.
        other = admin.endpoints.submit("add", [5], [5])
        with pytest.raises((NotFound, Forbidden)):
            keyed.jobs.get_by_id(other.id)
        admin.jobs.wait_for_job(other, timeout=60)


def test_sign_in_with_an_unknown_key_is_unauthorized(served: Server) -> None:
    server = tabserve.Server(served.url)
    with pytest.raises(Unauthorized):
        server.auth.sign_in(APIKeyAuth("not-a-key"))
    assert not server.auth.signed_in


def test_max_age_on_publish_and_query_and_submit_still_makes_a_job(
    admin: tabserve.Server,
) -> None:
    item = admin.endpoints.publish("cached_add", add, max_age=600, mode=PublishMode.Overwrite)
    assert item.max_age == 600
    assert admin.endpoints.get_by_name("cached_add").max_age == 600
    assert admin.endpoints.query("cached_add", [1], [2]) == [3]
    assert admin.endpoints.query("cached_add", [1], [2], max_age=60) == [3]
    # The endpoint's default would answer from the cache; a submission is a job all the same.
    job = admin.endpoints.submit("cached_add", [1], [2])
    assert isinstance(job, JobItem)
    assert admin.jobs.wait_for_job(job, timeout=60).status is JobStatus.SUCCESS
    with pytest.raises(ValueError, match="max_age"):
        admin.endpoints.query("cached_add", [1], [2], max_age=-1)


def test_jobs_and_keys_lists_page_and_filter(admin: tabserve.Server, served: Server) -> None:
    failed = admin.endpoints.submit("fails", 1)
    with pytest.raises(JobFailed):
        admin.jobs.wait_for_job(failed, timeout=60)
    jobs, pagination = admin.jobs.get(RequestOptions(pagesize=2))
    assert len(jobs) == 2 and pagination.total_available >= 2
    assert all(isinstance(job, JobItem) for job in jobs)
    failures = list(admin.jobs.filter(status=JobStatus.FAILURE, endpoint="fails"))
    assert failed.id in {job.id for job in failures}
    assert {job.status for job in failures} == {JobStatus.FAILURE}
    everyone = [job.id for job in Pager(admin.jobs, RequestOptions(pagesize=1))]
    assert len(everyone) == len(set(everyone)) == pagination.total_available

    made = [admin.keys.create(endpoint="add")[0] for _ in range(3)]
    endpoint_keys = admin.keys.filter(kind="endpoint", endpoint="add")
    assert {key.id for key in made} <= {key.id for key in endpoint_keys}
    page, paged = admin.keys.get(RequestOptions(pagesize=2))
    assert len(page) == 2 and paged.total_available == len(list(Pager(admin.keys)))
    # Without paging parameters, /keys answers as before: every key, no pagination.
    plain = requests.get(served.url + "/keys", auth=ADMIN, timeout=30).json()
    assert "pagination" not in plain and len(plain["keys"]) == paged.total_available
