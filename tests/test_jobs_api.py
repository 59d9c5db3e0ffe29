"""Asynchronous jobs (Prefer: respond-async) and their results, over HTTP against real servers:
status codes, failure messages, cancellation that kills the worker, the last worker kept for
synchronous calls, restarts in both store backends, visibility, downloads and expiry."""

from __future__ import annotations

import base64
import csv
import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from pg import PostgresServer

from helpers import InProcessServer, Server, ServerFactory
from tabserve.cli import main
from tabserve.server.jobs import Replica, is_orphaned
from tabserve.store.backends import JobRecord, open_store
from tabserve.store.records import PENDING
from tabserve.store.state_dir import ensure_state_dir

ASYNC = {"Prefer": "respond-async"}


def wait_status(server: Server | InProcessServer, job_id: str, statuses: set[int],
                timeout: float = 30, **kwargs: Any) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        answer = server.get(f"/jobs/{job_id}", **kwargs)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()["job"]
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stayed {job}"
        time.sleep(0.05)


def submit(server: Server | InProcessServer, script: str, **kwargs: Any) -> str:
    answer = server.post("/evaluate", json={"script": script, "data": {}}, headers=ASYNC, **kwargs)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job"]["id"]
    assert answer.headers["Location"] == f"/jobs/{job_id}"
    return job_id


def spinner(pid_file: Path) -> str:
    """A script that records its worker's pid, then burns CPU until killed."""
    return f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\nwhile True: pass"


def wait_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def cpu_stops(pid: int, within: float) -> bool:
    """True once the process is gone or its CPU time stops growing, within ``within`` s."""
    deadline = time.monotonic() + within
    try:
        process = psutil.Process(pid)
        last = sum(process.cpu_times()[:2])
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
            now = sum(process.cpu_times()[:2])
            if now == last:
                return True
            last = now
    except psutil.NoSuchProcess:
        return True
    return False


@pytest.fixture(scope="module")
def jobs_server(server_factory: ServerFactory) -> Server:
    # Two workers: one job slot, one worker kept for synchronous calls.
    return server_factory(TABPY_EVALUATE_TIMEOUT="2", TABSERVE_JOB_TIMEOUT="6")


def test_a_job_answers_202_then_succeeds_with_a_result(jobs_server: Server) -> None:
    server = jobs_server
    answer = server.post(
        "/evaluate",
        json={"script": "return [x * 2 for x in _arg1]", "data": {"_arg1": [1, 2, 3]}},
        headers=ASYNC,
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["Preference-Applied"] == "respond-async"
    job = answer.json()["job"]
    assert set(job) == {"id", "status", "error", "query_result_id", "created_at", "updated_at"}
    assert job["status"] in (1, 2) and job["error"] is None and job["query_result_id"] is None
    done = wait_status(server, job["id"], {3, 4, 5})
    assert done["status"] == 3, done
    result_id = done["query_result_id"]
    result = server.get(f"/query_results/{result_id}").json()["query_result"]
    assert result["data"] == [2, 4, 6]
    assert result["id"] == result_id and result["endpoint"] is None
    assert result["runtime_ms"] >= 0 and result["retrieved_at"] <= time.time()
    as_json = server.get(f"/query_results/{result_id}.json")
    assert as_json.json() == [2, 4, 6]
    assert as_json.headers["Content-Disposition"] == (
        f'attachment; filename="evaluate-{result_id}.json"'
    )
    as_csv = server.get(f"/query_results/{result_id}.csv")
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    assert as_csv.headers["Content-Disposition"].endswith(f'{result_id}.csv"')
    assert list(csv.reader(io.StringIO(as_csv.text))) == [["value"], ["2"], ["4"], ["6"]]
    # Every answer about a job or a result is the caller's: kept by no cache, and a page it
    # opens sends no Referer (a download's URL may carry an API key).
    for private in (answer, server.get(f"/jobs/{job['id']}"), server.get("/jobs"),
                    server.get(f"/query_results/{result_id}"), as_json, as_csv):  # fmt: skip
        assert private.headers["Cache-Control"] == "no-store", private.url
        assert private.headers["Referrer-Policy"] == "no-referrer", private.url
    head = server.request("HEAD", f"/query_results/{result_id}.csv")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["Content-Disposition"] == as_csv.headers["Content-Disposition"]


def test_a_failed_job_carries_the_synchronous_error(jobs_server: Server) -> None:
    script = "return 1 / 0"
    synchronous = jobs_server.post("/evaluate", json={"script": script, "data": {}})
    assert synchronous.status_code == 500
    job = wait_status(jobs_server, submit(jobs_server, script), {3, 4, 5})
    assert job["status"] == 4 and job["query_result_id"] is None
    assert job["error"] == synchronous.json()


def test_jobs_have_their_own_timeout(jobs_server: Server) -> None:
    """TABPY_EVALUATE_TIMEOUT is 2 s here and TABSERVE_JOB_TIMEOUT 6 s."""
    slow = "import time\ntime.sleep(3)\nreturn 7"
    # The job (in the job slot) and the synchronous call (on the other worker) run side by
    # side: the same two outcomes, without waiting out one before starting the other.
    job_id = submit(jobs_server, slow)
    assert jobs_server.post("/evaluate", json={"script": slow, "data": {}}).status_code == 408
    job = wait_status(jobs_server, job_id, {3, 4, 5})
    assert job["status"] == 3, job
    endless = wait_status(jobs_server, submit(jobs_server, "while True: pass"), {3, 4, 5})
    assert endless["status"] == 4
    # As a synchronous call's 408, with the job's timeout.
    assert endless["error"]["message"] == "User defined script timed out. Timeout is set to 6.0 s."


def test_cancelling_a_running_job_kills_its_worker_and_a_pending_one_never_runs(
    jobs_server: Server, tmp_path: Path
) -> None:
    server = jobs_server
    # Earlier tests' timeouts killed workers: wait for their replacements to be up.
    deadline = time.monotonic() + 60
    while server.metric("tabserve_workers") < 2 or server.metric("tabserve_workers_busy") > 0:
        assert time.monotonic() < deadline, "the pool never healed"
        time.sleep(0.1)
    first = submit(server, spinner(tmp_path / "first.pid"))
    pid = wait_pid(tmp_path / "first.pid")
    assert wait_status(server, first, {2})["status"] == 2
    # One job slot (two workers): the second waits, and the last worker stays free.
    second = submit(server, spinner(tmp_path / "second.pid"))
    time.sleep(0.5)
    assert server.get(f"/jobs/{second}").json()["job"]["status"] == 1
    quick = server.post("/evaluate", json={"script": "return 1", "data": {}}, timeout=10)
    assert quick.status_code == 200 and quick.text == "1"

    pending = server.request("DELETE", f"/jobs/{second}")
    assert pending.status_code == 200 and pending.json()["job"]["status"] == 5
    running = server.request("DELETE", f"/jobs/{first}")
    assert running.status_code == 200 and running.json()["job"]["status"] == 5
    assert cpu_stops(pid, within=2.0), "the cancelled job's worker kept running"
    time.sleep(1.5)
    assert server.get(f"/jobs/{first}").json()["job"]["status"] == 5
    assert server.get(f"/jobs/{second}").json()["job"]["status"] == 5
    assert not (tmp_path / "second.pid").exists()  # never started
    # A finished job is left as it was.
    again = server.request("DELETE", f"/jobs/{first}")
    assert again.status_code == 200 and again.json()["job"]["status"] == 5


def test_bad_input_is_a_clear_4xx(jobs_server: Server) -> None:
    server = jobs_server
    unknown = server.get("/jobs/no-such-job")
    assert unknown.status_code == 404
    assert unknown.json() == {"message": "Unknown job", "info": "There is no job 'no-such-job'."}
    assert server.request("DELETE", "/jobs/no-such-job").status_code == 404
    assert server.get("/query_results/nothing").status_code == 404
    assert server.get("/query_results/nothing.csv").status_code == 404
    # A malformed Prefer header is ignored (RFC 7240): the call runs synchronously.
    for prefer in (";;;", "respond-sync", "wait", ""):
        answer = server.post(
            "/evaluate", json={"script": "return 2", "data": {}}, headers={"Prefer": prefer}
        )
        assert (answer.status_code, answer.text) == (200, "2"), prefer
        assert "Location" not in answer.headers
    # Several preferences, one of them respond-async.
    answer = server.post(
        "/evaluate",
        json={"script": "return 2", "data": {}},
        headers={"Prefer": "wait=10, respond-async; x=1"},
    )
    assert answer.status_code == 202


def test_queued_jobs_are_capped_in_number_and_request_bytes(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Beyond TABSERVE_JOB_MAX_PENDING jobs, or TABSERVE_JOB_MAX_REQUEST_MB of their request
    bodies, a submission is a 503 with Retry-After; an ended job frees its place."""
    server = server_factory(TABSERVE_JOB_MAX_PENDING="3", TABSERVE_JOB_MAX_REQUEST_MB="1")
    running = submit(server, spinner(tmp_path / "spin.pid"))  # holds the one job slot
    wait_pid(tmp_path / "spin.pid")
    queued = [submit(server, "return 1"), submit(server, "return 2")]
    full = server.post("/evaluate", json={"script": "return 3", "data": {}}, headers=ASYNC)
    assert full.status_code == 503, full.text
    assert full.json()["message"] == "Server is busy: too many asynchronous jobs"
    assert "TABSERVE_JOB_MAX_PENDING (3)" in full.json()["info"]
    assert int(full.headers["Retry-After"]) >= 1
    # A synchronous call is not a job: it still runs.
    assert server.post("/evaluate", json={"script": "return 4", "data": {}}).text == "4"
    for job_id in queued:
        assert server.request("DELETE", f"/jobs/{job_id}").json()["job"]["status"] == 5
    # Room again, now by count; 600 kB twice is beyond 1 MiB of requests.
    large = {"script": "return len(_arg1)", "data": {"_arg1": "x" * 600_000}}
    first = server.post("/evaluate", json=large, headers=ASYNC)
    assert first.status_code == 202, first.text
    second = server.post("/evaluate", json=large, headers=ASYNC)
    assert second.status_code == 503, second.text
    assert "TABSERVE_JOB_MAX_REQUEST_MB" in second.json()["info"]
    assert "Retry-After" in second.headers
    # A single body over the whole allowance can never fit: 413, not 503.
    huge = {"script": "return 0", "data": {"_arg1": "x" * 1_100_000}}
    assert server.post("/evaluate", json=huge, headers=ASYNC).status_code == 413
    server.request("DELETE", f"/jobs/{first.json()['job']['id']}")
    assert server.post("/evaluate", json=large, headers=ASYNC).status_code == 202
    server.request("DELETE", f"/jobs/{running}")


@pytest.fixture
def result_app(app_factory: Any) -> InProcessServer:
    return app_factory(TABSERVE_RESULT_TTL="1")


def test_results_expire(result_app: InProcessServer) -> None:
    job = wait_status(result_app, submit(result_app, "return {'a': [1, 2], 'b': ['x', 'y']}"),
                      {3, 4, 5})  # fmt: skip
    result_id = job["query_result_id"]
    table = result_app.get(f"/query_results/{result_id}.csv")
    assert list(csv.reader(io.StringIO(table.text))) == [["a", "b"], ["1", "x"], ["2", "y"]]
    time.sleep(1.3)
    expired = result_app.get(f"/query_results/{result_id}")
    assert expired.status_code == 404
    assert expired.json()["message"] == "Unknown query result"


def test_results_are_capped_in_total_size(app_factory: Any) -> None:
    app = app_factory(TABSERVE_RESULT_MAX_MB="1")
    ids = []
    for n in range(3):  # three results of 400 kB in 1 MiB: the oldest goes
        job = wait_status(app, submit(app, f"return 'x' * 400000 + '{n}'"), {3, 4, 5})
        assert job["status"] == 3
        ids.append(job["query_result_id"])
    assert app.get(f"/query_results/{ids[0]}").status_code == 404
    for result_id in ids[1:]:
        assert app.get(f"/query_results/{result_id}").status_code == 200


def test_a_result_over_the_total_cap_fails_its_job(app_factory: Any) -> None:
    """A result alone over TABSERVE_RESULT_MAX_MB would be pruned as soon as it is stored:
    its job ends FAILURE saying so (507), and the results already kept stay."""
    app = app_factory(TABSERVE_RESULT_MAX_MB="1")
    kept = wait_status(app, submit(app, "return 'small'"), {3, 4, 5})
    assert kept["status"] == 3
    job = wait_status(app, submit(app, "return 'x' * 1_100_000"), {3, 4, 5})
    assert (job["status"], job["query_result_id"]) == (4, None), job
    assert job["error"]["message"] == "Result too large to store"
    assert "507 Insufficient Storage" in job["error"]["info"]
    assert "TABSERVE_RESULT_MAX_MB" in job["error"]["info"]
    assert app.get(f"/query_results/{kept['query_result_id']}").status_code == 200
    # Just under the cap still fits.
    fits = wait_status(app, submit(app, "return 'x' * 1_000_000"), {3, 4, 5})
    assert fits["status"] == 3, fits
    assert app.get(f"/query_results/{fits['query_result_id']}").status_code == 200


def test_csv_of_records_and_scalars(app: InProcessServer) -> None:
    records = wait_status(app, submit(app, "return [{'a': 1, 'b': 2}, {'a': 3, 'c': [4]}]"),
                          {3})  # fmt: skip
    text = app.get(f"/query_results/{records['query_result_id']}.csv").text
    assert list(csv.reader(io.StringIO(text))) == [["a", "b", "c"], ["1", "2", ""],
                                                   ["3", "", "[4]"]]  # fmt: skip
    scalar = wait_status(app, submit(app, "return 'one, cell'"), {3})
    text = app.get(f"/query_results/{scalar['query_result_id']}.csv").text
    assert list(csv.reader(io.StringIO(text))) == [["value"], ["one, cell"]]


# -- the store: restarts and visibility, in both backends ------------------------------------

ADMIN = ("admin", "admin-pass-1")
ALICE = ("alice", "alice-pass-1")
BOB = ("bob", "bob-pass-1")


@pytest.fixture(params=["statedir", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    if request.param == "statedir":
        yield {"TABPY_STATE_PATH": str(tmp_path / "state")}
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        url = pg.fresh_database(f"jobs_{tmp_path.name[-12:].lower()}")
        yield {"TABSERVE_STORE": url, "TABPY_STATE_PATH": str(tmp_path / "state")}


def test_jobs_survive_a_restart(
    server_factory: ServerFactory, location: dict[str, str], tmp_path: Path
) -> None:
    workdir = tmp_path / "one"
    workdir.mkdir()
    server = server_factory(workdir=workdir, **location)
    running = submit(server, spinner(tmp_path / "running.pid"))
    pid = wait_pid(tmp_path / "running.pid")
    wait_status(server, running, {2})
    pending = submit(server, "return 'ran after the restart'")
    time.sleep(0.3)
    assert server.get(f"/jobs/{pending}").json()["job"]["status"] == 1
    # The server dies without a chance to clean up (its spinning worker is killed too).
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    os.kill(pid, signal.SIGKILL)

    workdir = tmp_path / "two"
    workdir.mkdir()
    again = server_factory(workdir=workdir, **location)
    failed = wait_status(again, running, {3, 4, 5})
    assert failed["status"] == 4
    assert failed["error"]["message"] == "Job interrupted"
    assert "stopped" in failed["error"]["info"]
    done = wait_status(again, pending, {3, 4, 5})
    assert done["status"] == 3, done
    result = again.get(f"/query_results/{done['query_result_id']}").json()["query_result"]
    assert result["data"] == "ran after the restart"


def _running_job(store: Any, job_id: str, claimed_by: str) -> None:
    """A job ``claimed_by`` is running, heartbeating a moment ago as a live replica does
    (a minute ahead, so that no slowness of this test makes it stale)."""
    store.put_job(JobRecord(job_id, "evaluate", None, "", PENDING, b"{}", "", time.time()))
    assert store.claim_job(claimed_by).id == job_id
    with store._database().write() as tx:
        tx.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time() + 60, job_id))


def test_a_replica_in_another_pid_namespace_keeps_its_running_job(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Replicas on one hostname (host-network containers) need not share pids: a pid that
    is dead here may be another namespace's live replica. Only a runner of this server's
    own host, PID namespace and boot is ended at once for a dead pid; elsewhere the
    heartbeat decides."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nothing here runs as
    me = Replica.current()
    assert me.pid_namespace and me.boot_id  # Linux: both are readable
    state = tmp_path / "state"
    ensure_state_dir(state)
    store = open_store(state)
    store.migrate()
    try:
        elsewhere = replace(me, pid=gone.pid, pid_namespace=str(int(me.pid_namespace) + 1))
        _running_job(store, "other-namespace", elsewhere.claim("aaaa"))
        rebooted = replace(me, pid=gone.pid, boot_id="00000000-0000-0000-0000-000000000000")
        _running_job(store, "other-boot", rebooted.claim("bbbb"))
        _running_job(store, "here", replace(me, pid=gone.pid).claim("cccc"))
    finally:
        store.close()
    server = server_factory(workdir=tmp_path, TABPY_STATE_PATH=str(state))
    # The server looked for orphans before it answered anything.
    here = server.get("/jobs/here").json()["job"]
    assert (here["status"], here["error"]["message"]) == (4, "Job interrupted")
    for job_id in ("other-namespace", "other-boot"):
        assert server.get(f"/jobs/{job_id}").json()["job"]["status"] == 2, job_id


def test_only_a_runner_of_this_pid_space_is_judged_by_its_pid() -> None:
    me = Replica.current()
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    fresh, stale = now - 1, now - 3600
    here = replace(me, pid=dead.pid)
    assert is_orphaned(me, here.claim("t"), fresh, now)  # dead here: at once
    assert not is_orphaned(me, replace(me, pid=os.getppid()).claim("t"), fresh, now)  # alive
    for other in (
        replace(here, pid_namespace=str(int(me.pid_namespace) + 1)),
        replace(here, boot_id="another-boot"),
        replace(here, host=me.host + "-other"),
    ):
        assert not is_orphaned(me, other.claim("t"), fresh, now), other
        assert is_orphaned(me, other.claim("t"), stale, now), other
    # An older tabserve's host:pid:token, and anything else: the heartbeat decides.
    for claimed_by in (f"{me.host}:{dead.pid}:abcd", "", None):
        assert not is_orphaned(me, claimed_by, fresh, now)
        assert is_orphaned(me, claimed_by, stale, now)
    # Where /proc cannot be read nothing is known to share pids.
    blind = replace(me, pid_namespace="", boot_id="")
    assert not is_orphaned(blind, replace(blind, pid=dead.pid).claim("t"), fresh, now)


def _add_users(location: dict[str, str]) -> None:
    store = location.get("TABSERVE_STORE", location["TABPY_STATE_PATH"])
    for (name, password), permissions in ((ADMIN, "all"), (ALICE, "evaluate,query"),
                                          (BOB, "evaluate,query")):  # fmt: skip
        assert main(["user", "add", "-u", name, "-p", password, "--permissions", permissions,
                     "--store", store]) == 0  # fmt: skip


def _double_archive() -> str:
    def double(x: list[int]) -> list[int]:  # nested: pickled by value, not by module
        return [2 * v for v in x]

    return base64.b64encode(cloudpickle.dumps(double)).decode()


def test_only_the_creator_or_a_manager_sees_a_job(
    server_factory: ServerFactory, location: dict[str, str], tmp_path: Path
) -> None:
    _add_users(location)
    server = server_factory(workdir=tmp_path, auth=ADMIN, TABSERVE_USERS="store", **location)
    body = {"name": "double", "type": "model", "archive": _double_archive()}
    assert server.post("/endpoints", json=body).status_code == 201
    answer = server.post("/query/double", json={"data": {"x": [1, 2]}}, headers=ASYNC, auth=ALICE)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job"]["id"]
    job = wait_status(server, job_id, {3, 4, 5}, auth=ALICE)
    assert job["status"] == 3, job
    result_id = job["query_result_id"]
    result = server.get(f"/query_results/{result_id}", auth=ALICE).json()["query_result"]
    assert (result["endpoint"], result["version"], result["data"]) == ("double", 1, [2, 4])
    name = server.get(f"/query_results/{result_id}.csv", auth=ALICE).headers["Content-Disposition"]
    assert name == f'attachment; filename="double-{result_id}.csv"'
    # Someone else: the same 404 as for an id that does not exist.
    for path in (f"/jobs/{job_id}", f"/query_results/{result_id}",
                 f"/query_results/{result_id}.json"):  # fmt: skip
        assert server.get(path, auth=BOB).status_code == 404, path
        assert server.get(path, auth=ADMIN).status_code == 200, path  # manage sees all
    assert server.request("DELETE", f"/jobs/{job_id}", auth=BOB).status_code == 404
    # The list: one's own jobs, everyone's for a manager.
    listed = server.get("/jobs", auth=ALICE).json()
    assert [job["id"] for job in listed["jobs"]] == [job_id]
    assert listed["jobs"][0]["endpoint"] == "double"
    assert listed["pagination"]["total_available"] == 1
    assert server.get("/jobs", auth=BOB).json()["jobs"] == []
    assert job_id in {job["id"] for job in server.get("/jobs", auth=ADMIN).json()["jobs"]}
    assert server.get("/jobs?filter=status:eq:4", auth=ALICE).json()["jobs"] == []
    assert server.get("/jobs?filter=owner:eq:x", auth=ALICE).status_code == 400
    assert server.get(f"/jobs/{job_id}", auth=None).status_code == 401


def test_replicas_share_jobs_and_cancel_through_each_other(
    server_factory: ServerFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL store: a job submitted to one is read and cancelled
    through the other, and whichever runs it kills its worker."""
    url = postgres.fresh_database(f"jobrep_{tmp_path.name[-12:].lower()}")
    replicas = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        replicas.append(server_factory(workdir=workdir, TABSERVE_STORE=url))
    a, b = replicas
    job_id = submit(a, spinner(tmp_path / "spin.pid"))
    pid = wait_pid(tmp_path / "spin.pid")
    assert wait_status(b, job_id, {2})["status"] == 2
    cancelled = b.request("DELETE", f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["job"]["status"] == 5
    # The replica running it hears of it at its next heartbeat (every 2 s).
    assert cpu_stops(pid, within=6.0), "the job's worker kept running"
    assert a.get(f"/jobs/{job_id}").json()["job"]["status"] == 5
    done = wait_status(a, submit(b, "return 'either replica'"), {3, 4, 5})
    result = a.get(f"/query_results/{done['query_result_id']}").json()["query_result"]
    assert result["data"] == "either replica"
