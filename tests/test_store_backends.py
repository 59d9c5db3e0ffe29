"""The store's backends, each against the same tests: the state directory (state.ini, with
tabserve.db in SQLite), PostgreSQL (a real server from Debian's package), and the SQL store
on SQLite (the one schema's second dialect)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pg import PostgresServer

from tabserve.store.backends import (
    ApiKeyRecord,
    EndpointRecord,
    JobRecord,
    ResultRecord,
    StoreError,
    StoreUnavailable,
    UserRecord,
    open_store,
)
from tabserve.store.database import Database, redact, sqlite_url
from tabserve.store.jobs import JobLimitReached, JobLimits
from tabserve.store.records import CANCELLED, FAILURE, PENDING, STARTED, SUCCESS
from tabserve.store.schema import LATEST, MIGRATIONS, check_numbers
from tabserve.store.sql import SqlStore
from tabserve.store.state_dir import ensure_state_dir

FIXTURE_STATE = Path(__file__).parent / "fixtures" / "tabpy_state"
_counter = iter(range(10**6))


def _new_store(kind: str, tmp_path: Path, pg: PostgresServer | None) -> object:
    if kind == "statedir":
        ensure_state_dir(tmp_path / "state")
        store = open_store(tmp_path / "state")
    elif kind == "postgresql":
        assert pg is not None
        url = pg.fresh_database(f"t{next(_counter)}")
        store = open_store(url, cache=tmp_path / "cache")
    else:
        store = SqlStore(Database(sqlite_url(tmp_path / "all.db")), tmp_path / "cache")
    store.migrate()  # type: ignore[attr-defined]
    return store


@pytest.fixture(params=["statedir", "postgresql", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[callable]:  # type: ignore[valid-type]
    """A factory: the first call makes a store, later calls open the same one again."""
    pg = request.getfixturevalue("postgres") if kind == "postgresql" else None
    opened: list[object] = []

    def make() -> object:
        if not opened:
            store = _new_store(kind, tmp_path, pg)
        elif kind == "statedir":
            store = open_store(tmp_path / "state")
        elif kind == "postgresql":
            store = open_store(opened[0].db.url, cache=tmp_path / f"cache{len(opened)}")  # type: ignore[attr-defined]
        else:
            store = SqlStore(Database(sqlite_url(tmp_path / "all.db")), tmp_path / "cache")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()  # type: ignore[attr-defined]


@pytest.fixture
def store(make_store):  # type: ignore[no-untyped-def]
    return make_store()


def _model(name: str, version: int = 1, **extra: object) -> EndpointRecord:
    return EndpointRecord(
        name=name, type="model", version=version, description=f"{name} v{version}",
        docstring="Adds.\n  100% ünïcode", **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def test_migrations_are_numbered_in_order() -> None:
    check_numbers()
    assert MIGRATIONS[-1].number == LATEST


def test_migrate_is_idempotent_and_recorded(store) -> None:  # type: ignore[no-untyped-def]
    db = store.sql.db if hasattr(store, "sql") else store.db
    assert db.schema_version() == LATEST
    assert db.migrate() == []
    db.require_current()


def test_a_newer_database_stops_the_start(store) -> None:  # type: ignore[no-untyped-def]
    db = store.sql.db if hasattr(store, "sql") else store.db
    with db.write() as tx:
        tx.execute(
            "INSERT INTO schema_migrations (number, description, applied) VALUES (?, ?, ?)",
            (LATEST + 1, "from the future", 0.0),
        )
    with pytest.raises(StoreError, match="newer than this tabserve"):
        db.migrate()
    with pytest.raises(StoreError, match="upgrade tabserve"):
        db.require_current()


def test_endpoints_round_trip_with_their_archives(store) -> None:  # type: ignore[no-untyped-def]
    add = _model("add", schema={"sample": [1, 2]}, python_version="3.11.7")
    with store.change() as change:
        assert change.endpoints == {}
        change.put(add, archive=b"\x80\x04pickle-bytes")
        change.put(EndpointRecord(name="plus", type="alias", target="add", dependencies=["add"]))
    snapshot = store.snapshot()
    assert snapshot.endpoints == {"add": add, "plus": snapshot.endpoints["plus"]}
    assert snapshot.endpoints["plus"].target == "add"
    assert store.archive("add", 1) == b"\x80\x04pickle-bytes"
    assert store.materialize(snapshot.endpoints) == []
    assert store.archive_path(add).read_bytes() == b"\x80\x04pickle-bytes"


def test_a_failed_change_writes_nothing(store) -> None:  # type: ignore[no-untyped-def]
    with store.change() as change:
        change.put(_model("keep"), archive=b"v1")
    before = store.snapshot().endpoints
    with pytest.raises(RuntimeError), store.change() as change:
        change.put(_model("keep", 2), archive=b"v2")
        change.put(_model("other"), archive=b"x")
        raise RuntimeError("the load check failed")
    assert store.snapshot().endpoints == before
    assert store.archive("other", 1) is None


def test_only_the_current_and_previous_versions_are_kept(store) -> None:  # type: ignore[no-untyped-def]
    for version in (1, 2, 3):
        with store.change() as change:
            change.put(_model("m", version), archive=f"v{version}".encode())
    assert store.archive("m", 1) is None
    assert store.archive("m", 2) == b"v2"
    assert store.archive("m", 3) == b"v3"
    with store.change() as change:
        change.delete("m")
    assert store.snapshot().endpoints == {}
    assert store.archive("m", 3) is None


def test_concurrent_writers_never_lose_an_update(make_store) -> None:  # type: ignore[no-untyped-def]
    """Each writer has its own connection (or file handle) and bumps one endpoint's version:
    every bump lands, as consecutive versions."""
    first = make_store()
    with first.change() as change:
        change.put(_model("m"), archive=b"v1")
    stores = [first] + [make_store() for _ in range(3)]
    seen: list[int] = []
    errors: list[BaseException] = []

    def bump(store) -> None:  # type: ignore[no-untyped-def]
        try:
            for _ in range(5):
                with store.change() as change:
                    version = change.endpoints["m"].version + 1
                    time.sleep(0.002)  # widen the read-modify-write window
                    change.put(_model("m", version), archive=b"v%d" % version)
                seen.append(version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(seen) == list(range(2, 22))
    assert first.snapshot().endpoints["m"].version == 21


def test_users_are_added_changed_and_removed(store) -> None:  # type: ignore[no-untyped-def]
    alice = UserRecord("alice", "scrypt$abc", frozenset({"query"}))
    store.put_user(alice, create=True)
    with pytest.raises(KeyError):
        store.put_user(alice, create=True)
    store.put_user(replace(alice, permissions=None), create=False)
    assert store.users() == {"alice": UserRecord("alice", "scrypt$abc", None)}
    store.delete_user("alice")
    assert store.users() == {}
    with pytest.raises(KeyError):
        store.delete_user("alice")
    with pytest.raises(KeyError):
        store.put_user(alice, create=False)


def test_deleting_a_user_revokes_their_keys(store) -> None:  # type: ignore[no-untyped-def]
    """A key names its user by name: left active, it would act as a new user of that name."""
    for name in ("alice", "bob"):
        store.put_user(UserRecord(name, "scrypt$abc", None), create=True)
    store.add_api_key(ApiKeyRecord("a" * 16, "h1", "alice", None, 1.0))
    store.add_api_key(ApiKeyRecord("b" * 16, "h2", "bob", None, 1.0))
    store.add_api_key(ApiKeyRecord("c" * 16, "h3", "alice", None, 1.0, revoked=5.0))
    store.add_api_key(ApiKeyRecord("d" * 16, "h4", "", "churn", 1.0))  # an endpoint key
    before = time.time()
    store.delete_user("alice")
    assert store.api_key("a" * 16).revoked >= before
    assert store.api_key("c" * 16).revoked == 5.0  # the first revocation's time stays
    assert store.api_key("b" * 16).revoked is None  # someone else's
    assert store.api_key("d" * 16).revoked is None
    store.put_user(UserRecord("alice", "scrypt$new", None), create=True)
    assert store.api_key("a" * 16).revoked is not None  # the new alice gets none of them


# The bare SQL store on SQLite has no watcher: the state directory's is tested instead.
@pytest.mark.parametrize("kind", ["statedir", "postgresql"])
def test_another_writer_is_noticed_within_a_second(kind, make_store) -> None:  # type: ignore[no-untyped-def]
    watcher, writer = make_store(), make_store()
    heard = threading.Event()
    watcher.watch(heard.set)
    time.sleep(0.5)  # connected (or polling)
    heard.clear()
    token = watcher.token()
    started = time.monotonic()
    with writer.change() as change:
        change.put(_model("new"), archive=b"x")
    assert heard.wait(5), "no change notification"
    elapsed = time.monotonic() - started
    assert watcher.token() != token
    print(f"\nchange seen by another store after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0


def test_the_tabpy_state_directory_loads(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE_STATE, tmp_path / "state")
    store = open_store(tmp_path / "state")
    store.migrate()
    endpoints = store.snapshot().endpoints
    assert set(endpoints) >= {"add", "scale"}
    assert endpoints["scale"].version == 2
    assert store.materialize(endpoints) == []
    store.close()


def test_an_unreachable_postgresql_is_unavailable(tmp_path: Path) -> None:
    from helpers import free_port

    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"
    store = open_store(url, cache=tmp_path)
    with pytest.raises(StoreUnavailable) as caught:
        store.snapshot()
    assert caught.value.status == 503
    assert caught.value.headers()["Retry-After"]
    assert "hunter2" not in str(caught.value)
    assert store.health()[0] is False
    store.close()


def test_urls_are_shown_without_passwords() -> None:
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://h/db") == "postgresql://h/db"
    with pytest.raises(StoreError, match="unsupported store"):
        open_store("mysql://u:pw@h/db")


def test_the_job_and_result_tables_hold_a_job_through_its_life(store) -> None:  # type: ignore[no-untyped-def]
    """The tables the jobs feature builds on: a job is queued, claimed once, finished, and
    its result found by key."""
    db = store.sql.db if hasattr(store, "sql") else store.db
    with db.write() as tx:
        for number in (1, 2):
            tx.execute(
                "INSERT INTO jobs (id, kind, endpoint, owner, status, request, created) "
                "VALUES (?, 'query', 'add', 'alice', 1, ?, ?)",
                (f"job{number}", b'{"data": {}}', float(number)),
            )
    claimed = []
    for worker in ("replica-a", "replica-b", "replica-c"):
        with db.write() as tx:
            rows = tx.execute(
                "UPDATE jobs SET status = 2, claimed_by = ?, started = 10 WHERE id = "
                "(SELECT id FROM jobs WHERE status = 1 ORDER BY created LIMIT 1) RETURNING id",
                (worker,),
            )
            claimed.extend(row[0] for row in rows)
    assert claimed == ["job1", "job2"]  # the third claimer finds nothing left
    with db.write() as tx:
        tx.execute(
            "INSERT INTO results (key, endpoint, version, body, retrieved_at, size) "
            "VALUES ('k1', 'add', 1, ?, 11, 3)",
            (b"[3]",),
        )
        tx.execute("UPDATE jobs SET status = 3, finished = 11, result_key = 'k1' WHERE id = 'job1'")
    with db.read() as tx:
        rows = tx.execute(
            "SELECT j.status, r.body FROM jobs j JOIN results r ON r.key = j.result_key "
            "WHERE j.id = 'job1'"
        )
    assert [(int(s), bytes(b)) for s, b in rows] == [(3, b"[3]")]


def _job(job_id: str, created: float, owner: str = "alice") -> JobRecord:
    return JobRecord(job_id, "evaluate", None, owner, PENDING, b'{"script": "return 1"}', "",
                     created)  # fmt: skip


def test_jobs_are_claimed_once_oldest_first_and_finish_with_their_result(store) -> None:  # type: ignore[no-untyped-def]
    store.put_job(_job("late", 20.0))
    store.put_job(_job("early", 10.0, owner="bob"))
    first = store.claim_job("replica-1")
    assert (first.id, first.status, first.claimed_by) == ("early", STARTED, "replica-1")
    assert store.claim_job("replica-2").id == "late"
    assert store.claim_job("replica-2") is None  # nothing pending is left
    assert store.job("early").request == b'{"script": "return 1"}'
    result = ResultRecord("r1", None, None, b"[1, 2]", time.time())
    assert store.finish_job("early", SUCCESS, None, result) == SUCCESS
    stored = store.result("r1")
    assert (stored.body, stored.owner) == (b"[1, 2]", "bob") and stored.runtime_ms >= 0
    # A cancelled job stays cancelled: its late outcome is not recorded.
    assert store.cancel_job("late").status == CANCELLED
    assert store.finish_job("late", SUCCESS, None, ResultRecord("r2", None, None, b"1", 1.0)) \
        == CANCELLED  # fmt: skip
    assert store.result("r2") is None
    assert store.cancel_job("early").status == SUCCESS  # finished: unchanged
    assert [job.id for job in store.recent_jobs("bob", 10)] == ["early"]
    assert [job.id for job in store.recent_jobs(None, 10)] == ["late", "early"]


def test_orphans_fail_and_results_are_pruned(store) -> None:  # type: ignore[no-untyped-def]
    store.put_job(_job("lost", 1.0))
    store.put_job(_job("kept", 2.0))
    store.claim_job("gone")
    store.claim_job("alive")
    failed = store.fail_orphaned_jobs(lambda claimed_by, _: claimed_by == "gone", '{"m": 1}')
    assert failed == ["lost"]
    assert (store.job("lost").status, store.job("lost").error) == (FAILURE, '{"m": 1}')
    assert store.job("kept").status == STARTED
    now = time.time()
    for n, age in enumerate((500, 50, 40, 30)):
        store.put_job(_job(f"j{n}", now - age))
        store.claim_job("alive")
        store.finish_job(f"j{n}", SUCCESS, None, ResultRecord(f"r{n}", None, None, b"x" * 100,
                                                              now - age))  # fmt: skip
    # Older than 100 s: gone; then the oldest until at most 250 bytes remain.
    assert store.prune_results(now - 100, 250) == 2
    assert [store.result(f"r{n}") is not None for n in range(4)] == [False, False, True, True]


def test_queued_and_running_jobs_are_capped_and_an_ended_job_keeps_no_request(store) -> None:  # type: ignore[no-untyped-def]
    """The limits hold for queued and running jobs only: an ended job (success, failure,
    cancellation, orphan) drops its request in the transaction that ends it, and frees its
    place."""
    body = b'{"script": "return 1"}'
    size = len(body)
    limits = JobLimits(pending=3, pending_per_owner=2, request_bytes=3 * size)
    store.put_job(_job("a1", 1.0), limits)
    store.put_job(_job("a2", 2.0), limits)
    with pytest.raises(JobLimitReached) as caught:
        store.put_job(_job("a3", 3.0), limits)  # alice's third
    assert (caught.value.limit, caught.value.current) == ("pending_per_owner", 2)
    assert store.job("a3") is None  # nothing written
    store.put_job(_job("b1", 4.0, owner="bob"), limits)
    with pytest.raises(JobLimitReached) as caught:
        store.put_job(_job("c1", 5.0, owner="carol"), limits)
    assert caught.value.limit == "pending"
    # Bytes: a roomier count, the same bytes.
    by_size = JobLimits(pending=10, pending_per_owner=10, request_bytes=3 * size)
    with pytest.raises(JobLimitReached) as caught:
        store.put_job(_job("c1", 5.0, owner="carol"), by_size)
    assert (caught.value.limit, caught.value.current) == ("request_bytes", 3 * size)

    # Each way of ending a job empties its request and frees its place.
    store.claim_job("replica-1")  # a1
    store.finish_job("a1", SUCCESS, None, ResultRecord("r1", None, None, b"1", time.time()))
    store.cancel_job("a2")  # pending
    store.claim_job("replica-1")  # b1
    assert store.fail_orphaned_jobs(lambda claimed_by, _: True, '{"m": 1}') == ["b1"]
    for job_id, status in (("a1", SUCCESS), ("a2", CANCELLED), ("b1", FAILURE)):
        job = store.job(job_id)
        assert (job.status, job.request) == (status, b""), job_id
    store.put_job(_job("c1", 5.0, owner="carol"), by_size)
    store.claim_job("replica-1")
    store.finish_job("c1", FAILURE, '{"m": 2}', None)
    assert store.job("c1").request == b""
    store.put_job(_job("c2", 6.0, owner="carol"), limits)
    store.claim_job("replica-1")
    assert store.cancel_job("c2").request == b""  # a running job cancelled
    for n in range(3):  # everything ended: the whole of each limit is free again
        store.put_job(_job(f"d{n}", 7.0 + n, owner=f"user{n}"), limits)
    assert store.job("d0").request == body  # a queued job keeps its request
