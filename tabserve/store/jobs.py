"""Jobs and their results in the store's SQL database: the same code for both backends.

The state directory keeps them in ``tabserve.db`` (SQLite, WAL), PostgreSQL in its own
tables; the tables are migration 2's ``jobs`` and ``results`` (``store/schema.py``). None of
these writes bumps the change generation: a job is not a change of the endpoint table, and
replicas must not reload their endpoints for every call.

A job is claimed in one exclusive transaction (``status`` 1 -> 2, ``claimed_by`` set), so
two replicas never run the same job. A finished job's result row is written in the same
transaction as its status, so a SUCCESS always has a result to point at.

A job keeps its request body only while it may still run: every write that ends a job
(success, failure, cancellation, an orphan's failure) empties ``request`` in the same
transaction. So the bytes the jobs table holds are those of queued and running jobs, which
:class:`JobLimits` bounds when a job is queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .database import Database, Tx
from .records import CANCELLED, FAILURE, PENDING, STARTED, JobRecord, ResultRecord

# What an ended job keeps of its request: nothing (the column is NOT NULL).
_CLEARED = b""


@dataclass(frozen=True)
class JobLimits:
    """Bounds on what queued and running jobs may hold, checked as a job is queued."""

    pending: int  # queued or running jobs, everyone's
    pending_per_owner: int  # queued or running jobs of one owner
    request_bytes: int  # the total size of their request bodies


class JobLimitReached(Exception):
    """Queuing the job would exceed one of :class:`JobLimits`; nothing was written.

    ``limit`` names the field of :class:`JobLimits`; ``current`` is what is held now.
    """

    def __init__(self, limit: str, current: int) -> None:
        super().__init__(f"{limit}: {current} held")
        self.limit = limit
        self.current = current


_JOB_COLUMNS = (
    "id, kind, endpoint, owner, status, request, encoding, created, started, finished, "
    "claimed_by, heartbeat, error, result_key"
)


def _job(row: tuple[object, ...]) -> JobRecord:
    values = list(row)
    request = values[5]
    # memoryview from PostgreSQL; '' where a listing left the request out.
    values[5] = b"" if isinstance(request, str) else bytes(request)  # type: ignore[arg-type]
    values[3] = values[3] or ""
    return JobRecord(*values)  # type: ignore[arg-type]


class JobTables:
    """The job and result methods of a store; ``_database()`` is the SQL database."""

    def _database(self) -> Database:
        raise NotImplementedError

    # -- jobs ------------------------------------------------------------------------------

    def put_job(self, job: JobRecord, limits: JobLimits | None = None) -> None:
        """Queue ``job``. With ``limits``, raise :class:`JobLimitReached` instead when it
        would take the queued and running jobs beyond one of them: checked in the write
        transaction, so concurrent submissions (of every replica) cannot overshoot."""
        with self._database().write() as tx:
            if limits is not None:
                _check_limits(tx, job, limits)
            tx.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                (
                    job.id, job.kind, job.endpoint, job.owner, job.status, job.request,
                    job.encoding, job.created, job.started, job.finished, job.claimed_by,
                    job.heartbeat, job.error, job.result_key,
                ),
            )  # fmt: skip

    def job(self, job_id: str) -> JobRecord | None:
        with self._database().read() as tx:
            rows = tx.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def claim_job(self, replica: str) -> JobRecord | None:
        """The oldest pending job, now STARTED and claimed by ``replica``; None if none."""
        now = time.time()
        # A read first: polling finds nothing most of the time, and must not queue on the
        # write lock (PostgreSQL's is every replica's) for that.
        with self._database().read() as tx:
            if not tx.execute("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (PENDING,)):
                return None
        with self._database().write() as tx:
            rows = tx.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = ? ORDER BY created LIMIT 1",
                (PENDING,),
            )
            if not rows:
                return None
            job = _job(rows[0])
            tx.execute(
                "UPDATE jobs SET status = ?, started = ?, claimed_by = ?, heartbeat = ? "
                "WHERE id = ?",
                (STARTED, now, replica, now, job.id),
            )
        return replace(job, status=STARTED, started=now, claimed_by=replica, heartbeat=now)

    def heartbeat_jobs(self, ids: Iterable[str]) -> dict[str, int]:
        """Mark ``ids`` (running here) alive; returns each one's status, so that a job
        cancelled through another replica is seen by the one running it."""
        ids = list(ids)
        if not ids:
            return {}
        now = time.time()
        marks = ", ".join("?" for _ in ids)
        with self._database().write() as tx:
            tx.execute(
                f"UPDATE jobs SET heartbeat = ? WHERE status = ? AND id IN ({marks})",
                (now, STARTED, *ids),
            )
            rows = tx.execute(f"SELECT id, status FROM jobs WHERE id IN ({marks})", ids)
        return {str(job_id): int(status) for job_id, status in rows}

    def finish_job(
        self, job_id: str, status: int, error: str | None, result: ResultRecord | None
    ) -> int:
        """Record how a started job ended (with its result) unless it was cancelled
        meanwhile; returns the status it has now."""
        now = time.time()
        with self._database().write() as tx:
            rows = tx.execute("SELECT status FROM jobs WHERE id = ?", (job_id,))
            if not rows:
                return CANCELLED
            if int(rows[0][0]) != STARTED:
                return int(rows[0][0])
            if result is not None:
                _insert_result(tx, result)
            tx.execute(
                "UPDATE jobs SET status = ?, finished = ?, error = ?, result_key = ?, "
                "request = ? WHERE id = ?",
                (status, now, error, None if result is None else result.id, _CLEARED, job_id),
            )
        return status

    def cancel_job(self, job_id: str) -> JobRecord | None:
        """Cancel a pending or running job (a finished one stays as it is); the job after."""
        now = time.time()
        with self._database().write() as tx:
            tx.execute(
                "UPDATE jobs SET status = ?, finished = ?, request = ? "
                "WHERE id = ? AND status IN (?, ?)",
                (CANCELLED, now, _CLEARED, job_id, PENDING, STARTED),
            )
            rows = tx.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def fail_orphaned_jobs(
        self, orphaned: Callable[[str | None, float | None], bool], message: str
    ) -> list[str]:
        """End FAILURE every started job whose runner is gone (``orphaned(claimed_by,
        heartbeat)`` says so): the server running it stopped. Returns their ids."""
        now = time.time()
        with self._database().read() as tx:
            rows = tx.execute(
                "SELECT id, claimed_by, heartbeat FROM jobs WHERE status = ?", (STARTED,)
            )
        ids = [str(r[0]) for r in rows if orphaned(r[1], r[2])]
        if not ids:
            return []
        with self._database().write() as tx:
            for job_id in ids:
                tx.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ?, request = ? "
                    "WHERE id = ? AND status = ?",
                    (FAILURE, now, message, _CLEARED, job_id, STARTED),
                )
        return ids

    def recent_jobs(self, owner: str | None, limit: int) -> list[JobRecord]:
        """The newest jobs (of ``owner``, or everyone's when None), requests left out."""
        columns = _JOB_COLUMNS.replace("request", "''")
        where, params = ("WHERE owner = ? ", (owner,)) if owner is not None else ("", ())
        with self._database().read() as tx:
            rows = tx.execute(
                f"SELECT {columns} FROM jobs {where}ORDER BY created DESC LIMIT ?",
                (*params, limit),
            )
        return [_job(row) for row in rows]

    # -- results ---------------------------------------------------------------------------

    def result(self, result_id: str) -> ResultRecord | None:
        """A stored result, with the run time and owner of the job that produced it."""
        with self._database().read() as tx:
            rows = tx.execute(
                "SELECT key, endpoint, version, body, retrieved_at FROM results WHERE key = ?",
                (result_id,),
            )
            if not rows:
                return None
            key, endpoint, version, body, retrieved_at = rows[0]
            jobs = tx.execute(
                "SELECT started, finished, owner FROM jobs WHERE result_key = ?", (result_id,)
            )
        runtime_ms = owner = None
        if jobs:
            started, finished, owner = jobs[0]
            if started is not None and finished is not None:
                runtime_ms = round((finished - started) * 1000, 3)
        return ResultRecord(
            str(key), endpoint, version, bytes(body), float(retrieved_at), runtime_ms, owner
        )

    def prune_results(self, older_than: float, max_bytes: int) -> int:
        """Drop results retrieved before ``older_than``, then the oldest until their total
        size is at most ``max_bytes``; returns how many went. Finished jobs older than
        ``older_than`` go too (their results are gone or going)."""
        removed = 0
        with self._database().write() as tx:
            removed += len(
                tx.execute(
                    "DELETE FROM results WHERE retrieved_at < ? RETURNING key", (older_than,)
                )
            )
            tx.execute(
                "DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (older_than,)
            )
            total = int(tx.execute("SELECT COALESCE(SUM(size), 0) FROM results")[0][0])
            if total > max_bytes:
                rows = tx.execute("SELECT key, size FROM results ORDER BY retrieved_at")
                for key, size in rows:
                    if total <= max_bytes:
                        break
                    tx.execute("DELETE FROM results WHERE key = ?", (key,))
                    total -= int(size)
                    removed += 1
        return removed


def _check_limits(tx: Tx, job: JobRecord, limits: JobLimits) -> None:
    # LENGTH of a BLOB (SQLite) or a bytea (PostgreSQL) is its size in bytes, read from the
    # row's header or TOAST pointer: the bodies themselves are not read.
    pending, mine, size = tx.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN owner = ? THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(LENGTH(request)), 0) FROM jobs WHERE status IN (?, ?)",
        (job.owner, PENDING, STARTED),
    )[0]
    if int(pending) >= limits.pending:
        raise JobLimitReached("pending", int(pending))
    if int(mine) >= limits.pending_per_owner:
        raise JobLimitReached("pending_per_owner", int(mine))
    if int(size) + len(job.request) > limits.request_bytes:
        raise JobLimitReached("request_bytes", int(size))


def _insert_result(tx: Tx, result: ResultRecord) -> None:
    tx.execute(
        "INSERT INTO results (key, endpoint, version, body, retrieved_at, size) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (result.id, result.endpoint, result.version, result.body, result.retrieved_at,
         result.size),
    )  # fmt: skip
