"""Asynchronous jobs: a call answered 202 at once, run in the background, its result kept.

A job is a row in the store (``store/jobs.py``) before it is anything else, so it survives a
restart: a pending job is run by whichever server claims it next, this one after a restart
included. Each server runs a claim loop that takes the oldest pending job whenever it has a
free job slot; a submission here wakes it at once, other replicas' submissions are found by a
poll every second.

Jobs never take the last worker: at most ``workers - 1`` run at once (one, with a single
worker), so a batch of jobs leaves a worker for Tableau's synchronous calls.

A running job's task is cancelled to cancel it: ``Executor.run`` then kills its worker at
once (SIGKILL to the process group, as for a timeout) and starts a replacement. A job
cancelled through another replica is noticed by the heartbeat that keeps the running job
alive in the store (every ``HEARTBEAT`` seconds). A job whose runner died (the server
stopped, or a replica vanished) is ended FAILURE by the next server that looks: at once when
its runner was a process this server can see (the same host, PID namespace and boot, see
:class:`Replica`) that no longer exists, after ``STALE`` seconds without a heartbeat
otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import logs
from ..errors import (
    InsufficientStorage,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    StoreUnavailable,
    TabserveError,
)
from ..protocol import JobKind
from ..store.backends import Store
from ..store.jobs import JobLimitReached, JobLimits
from ..store.records import (
    CANCELLED,
    FAILURE,
    FINISHED,
    PENDING,
    SUCCESS,
    JobRecord,
    ResultRecord,
)
from .credentials import User
from .endpoints import EndpointService
from .executor import Executor, JobResult

log = logging.getLogger("tabserve.jobs")

HEARTBEAT = 2.0  # seconds between a running job's heartbeats (and cancellation checks)
STALE = 30.0  # a started job of another pid space (Replica) without heartbeat this long: orphaned
POLL = 1.0  # seconds between looks for pending jobs submitted elsewhere
# When a full queue may have room again: jobs take seconds to hours, so a client told to
# come back in one second would mostly poll the store's write lock.
FULL_RETRY_AFTER = 5
PRUNE_EVERY = 60.0  # seconds between removals of expired results

KIND_QUERY = "query"
KIND_EVALUATE = "evaluate"
KIND_EVALUATE_NO_QUERY = "evaluate-noquery"  # tabpy.query() inside the script is refused

STOPPED = json.dumps(
    {
        "message": "Job interrupted",
        "info": "The server running this job stopped before the job finished.",
    }
)


@dataclass(frozen=True)
class Replica:
    """Where a server runs, as far as process ids go: a pid names one process only within
    one PID namespace of one boot of one host.

    Replicas may share a hostname without sharing pids: containers on the host's network
    are each pid 1 in a namespace of their own. Checking another replica's pid is only
    meaningful when all three match; ``pid_namespace`` and ``boot_id`` are empty where they
    cannot be read (no /proc), and then nothing matches.
    """

    host: str
    pid: int
    pid_namespace: str  # the inode number of /proc/self/ns/pid
    boot_id: str  # /proc/sys/kernel/random/boot_id: a new one at every boot

    @classmethod
    def current(cls) -> Replica:
        try:
            namespace = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            namespace = ""
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
                boot_id = file.read().strip()
        except (OSError, ValueError):
            boot_id = ""
        return cls(socket.gethostname(), os.getpid(), namespace, boot_id)

    def claim(self, token: str) -> str:
        """The ``claimed_by`` of this server's jobs: ``host:pid:namespace:boot:token`` (a
        hostname, an inode number and a boot id hold no ``:``)."""
        return f"{self.host}:{self.pid}:{self.pid_namespace}:{self.boot_id}:{token}"

    @classmethod
    def of(cls, claimed_by: str | None) -> Replica | None:
        """The replica a ``claimed_by`` names; None for another form (an older tabserve's
        ``host:pid:token`` included)."""
        parts = (claimed_by or "").split(":")
        if len(parts) != 5 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3])

    def sees_pids_of(self, other: Replica) -> bool:
        """Whether ``other``'s pid names a process of this server's pid space."""
        if not (self.pid_namespace and self.boot_id):
            return False
        space = (self.host, self.pid_namespace, self.boot_id)
        return (other.host, other.pid_namespace, other.boot_id) == space


def is_orphaned(me: Replica, claimed_by: str | None, heartbeat: float | None, now: float) -> bool:
    """Whether a started job claimed by ``claimed_by`` lost its runner (``me`` is the server
    asking, not the job's own runner). Its pid is only trusted in ``me``'s pid space; a
    runner anywhere else is gone once its heartbeat is ``STALE``."""
    stale = heartbeat is None or heartbeat < now - STALE
    runner = Replica.of(claimed_by)
    if runner is None or not me.sees_pids_of(runner):
        return stale
    if runner.pid == me.pid:
        return True  # this process's pid, another life: a restart that reused it
    try:
        os.kill(runner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return stale


def can_see(user: User, owner: str | None, endpoint: str | None) -> bool:
    """Whether ``user`` may see (and cancel) a job, or read a result, of ``owner`` made by
    calling ``endpoint`` (None for /evaluate). The one visibility rule of jobs and results.

    An endpoint key sees only that endpoint's (and, as anyone, only what it created).
    """
    if user.endpoint is not None and endpoint != user.endpoint:
        return False
    return user.can("manage") or owner == user.owner


def _queue_full(full: JobLimitReached, limits: JobLimits) -> Overloaded:
    """The 503 for a submission beyond a limit, naming the limit and its setting."""
    info = {
        "pending": f"{full.current} jobs are queued or running, the most "
        f"TABSERVE_JOB_MAX_PENDING ({limits.pending}) allows.",
        "pending_per_owner": f"This caller has {full.current} jobs queued or running, the "
        f"most TABSERVE_JOB_MAX_PENDING_PER_USER ({limits.pending_per_owner}) allows.",
        "request_bytes": f"Queued and running jobs hold {full.current} bytes of requests; "
        f"this one would take them beyond TABSERVE_JOB_MAX_REQUEST_MB "
        f"({limits.request_bytes} bytes).",
    }[full.limit]
    error = Overloaded("Server is busy: too many asynchronous jobs", info + " Retry later.")
    error.retry_after = FULL_RETRY_AFTER
    log.warning("jobs: submission refused: %s", info)
    return error


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="milliseconds")


def job_document(job: JobRecord) -> dict[str, Any]:
    """What GET /jobs/<id> answers, inside ``{"job": ...}``."""
    updated = job.finished or job.started or job.created
    return {
        "id": job.id,
        "status": job.status,
        # The {"message", "info"} envelope a synchronous call would have answered.
        "error": None if job.error is None else json.loads(job.error),
        "query_result_id": job.result_key,
        "created_at": _iso(job.created),
        "updated_at": _iso(updated),
    }


@dataclass(frozen=True)
class JobConfig:
    timeout: float  # TABSERVE_JOB_TIMEOUT
    cpu_seconds: int  # the worker's CPU backstop for a job (0: none)
    result_ttl: float
    result_max_bytes: int
    limits: JobLimits  # TABSERVE_JOB_MAX_PENDING, _PENDING_PER_USER, _REQUEST_MB


class JobService:
    """Submits, runs, reports and cancels jobs; reads their results."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        endpoints: EndpointService,
        config: JobConfig,
        evaluate_guard: Callable[[], None],
        query_refusal: Callable[[], str],
    ) -> None:
        self.store = store
        self.executor = executor
        self.endpoints = endpoints
        self.config = config
        self.evaluate_guard = evaluate_guard  # raises when scripts must not run
        self.query_refusal = query_refusal  # what tabpy.query() raises for evaluate-noquery
        self.me = Replica.current()
        self.replica = self.me.claim(secrets.token_hex(4))
        self.slots = max(1, executor.config.workers - 1)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """End what a stopped server left running, then start claiming pending jobs."""
        await self._fail_orphans()
        self._tasks = [
            asyncio.create_task(self._claim_loop()),
            asyncio.create_task(self._heartbeat_loop()),
        ]

    async def close(self) -> None:
        """Stop claiming; running jobs are killed and stay STARTED in the store, so that the
        next server ends them FAILURE (the server stopped); pending ones stay pending."""
        for task in [*self._tasks, *self._running.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._running.values(), return_exceptions=True)

    # -- the API ---------------------------------------------------------------------------

    async def submit(
        self, user: User, kind: str, endpoint: str | None, body: bytes, encoding: str
    ) -> JobRecord:
        job = JobRecord(
            id=uuid.uuid4().hex,
            kind=kind,
            endpoint=endpoint,
            owner=user.owner,
            status=PENDING,
            request=bytes(body),
            encoding=encoding,
            created=time.time(),
        )
        limits = self.config.limits
        if len(job.request) > limits.request_bytes:
            # No amount of waiting makes room for it: not a 503.
            raise PayloadTooLarge(
                f"Request with size {len(job.request)} exceeded limit of "
                f"{limits.request_bytes} (bytes).",
                "An asynchronous job's request may not be larger than TABSERVE_JOB_MAX_REQUEST_MB.",
            )
        try:
            await asyncio.to_thread(self.store.put_job, job, limits)
        except JobLimitReached as full:
            raise _queue_full(full, limits) from None
        self._wake.set()
        return job

    async def get(self, job_id: str, user: User) -> JobRecord:
        job = await asyncio.to_thread(self.store.job, job_id)
        if job is None or not can_see(user, job.owner, job.endpoint):
            # The same answer for someone else's job: ids do not leak.
            raise NotFound("Unknown job", f"There is no job {job_id!r}.")
        return job

    async def cancel(self, job_id: str, user: User) -> JobRecord:
        await self.get(job_id, user)
        job = await asyncio.to_thread(self.store.cancel_job, job_id)
        if job is None:
            raise NotFound("Unknown job", f"There is no job {job_id!r}.")
        task = self._running.get(job_id)
        if task is not None and job.status == CANCELLED:
            task.cancel()  # Executor.run kills the worker running it
        return job

    async def result(self, result_id: str, user: User) -> ResultRecord:
        result = await asyncio.to_thread(self.store.result, result_id)
        expired = result is None or result.retrieved_at < time.time() - self.config.result_ttl
        if result is None or expired or not can_see(user, result.owner, result.endpoint):
            raise NotFound(
                "Unknown query result",
                f"There is no query result {result_id!r}, or it has expired.",
            )
        return result

    async def recent(self, user: User, limit: int = 20) -> list[JobRecord]:
        owner = None if user.can("manage") else user.owner
        jobs = await asyncio.to_thread(self.store.recent_jobs, owner, limit)
        return [job for job in jobs if can_see(user, job.owner, job.endpoint)]

    # -- running ---------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            if len(self._running) >= self.slots:
                await self._sleep()
                continue
            try:
                job = await asyncio.to_thread(self.store.claim_job, self.replica)
            except StoreUnavailable as exc:
                log.warning("jobs: store unreachable, retrying: %s", exc.info)
                await asyncio.sleep(POLL)
                continue
            except Exception:
                log.exception("jobs: claiming a job failed")
                await asyncio.sleep(POLL)
                continue
            if job is None:
                await self._sleep()
                continue
            task = asyncio.create_task(self._execute(job))
            self._running[job.id] = task
            task.add_done_callback(lambda _, job_id=job.id: self._done(job_id))

    async def _sleep(self) -> None:
        """Until a job is submitted here, a slot frees, or the poll interval passes."""
        try:
            await asyncio.wait_for(self._wake.wait(), POLL)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def _done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._wake.set()

    async def _execute(self, job: JobRecord) -> None:
        logs.call_id.set(job.id)  # the worker's log lines for this job name it
        started = time.time()
        try:
            result = await self._call(job)
        except asyncio.CancelledError:
            log.info("job %s cancelled while running; its worker was killed", job.id)
            raise
        except TabserveError as exc:
            status, error, record = FAILURE, json.dumps(exc.envelope()), None
        except Exception as exc:  # a fault of ours: the job fails, the loop goes on
            log.exception("job %s failed unexpectedly", job.id)
            fault = TabserveError("Internal server error", f"{type(exc).__name__}: {exc}")
            status, error, record = FAILURE, json.dumps(fault.envelope()), None
        else:
            status, error, record = self._outcome(job, result)
        try:
            final = await asyncio.to_thread(self.store.finish_job, job.id, status, error, record)
        except Exception:
            log.exception("job %s: its outcome could not be recorded", job.id)
            return
        log.info(
            "job %s ended %s after %.3f s", job.id, {SUCCESS: "SUCCESS", FAILURE: "FAILURE"}
            .get(final, "CANCELLED"), time.time() - started,
        )  # fmt: skip
        if record is not None and final == SUCCESS:
            await self._prune()  # the total size cap holds after every new result

    def _outcome(
        self, job: JobRecord, result: JobResult
    ) -> tuple[int, str | None, ResultRecord | None]:
        """A job that ran to the end: SUCCESS with its result, unless the result alone is
        over the total size cap of results."""
        size = len(result.body)
        if size > self.config.result_max_bytes:
            # Stored, it would be pruned at once to keep that cap: a SUCCESS whose result is
            # a 404 (and every other result evicted for nothing). Say why instead.
            too_large = InsufficientStorage(
                "Result too large to store",
                f"507 Insufficient Storage: the job's result is {size} bytes, and stored "
                f"results may take at most {self.config.result_max_bytes} bytes in all "
                "(TABSERVE_RESULT_MAX_MB). Return less, or make the call synchronously.",
            )
            return FAILURE, json.dumps(too_large.envelope()), None
        version = result.meta.get("version")
        record = ResultRecord(
            id=uuid.uuid4().hex,
            endpoint=job.endpoint,
            version=int(version) if version is not None else None,
            body=bytes(result.body),  # stored: a bytearray (a large answer) becomes bytes
            retrieved_at=time.time(),
        )
        return SUCCESS, None, record

    async def _prune(self) -> None:
        try:
            await asyncio.to_thread(
                self.store.prune_results,
                time.time() - self.config.result_ttl,
                self.config.result_max_bytes,
            )
        except Exception:  # the next prune retries; a result too many is no failure
            log.exception("jobs: removing old results failed")

    async def _call(self, job: JobRecord) -> JobResult:
        options: dict[str, Any] = {"encoding": job.encoding}
        if self.config.cpu_seconds:
            options["cpu_seconds"] = int(2 * self.config.timeout) + 10
        if job.kind == KIND_QUERY:
            assert job.endpoint is not None
            self.endpoints.guard()
            await self.endpoints.resolve(job.endpoint)  # removed meanwhile: 404
            options["name"] = job.endpoint
            return await self.executor.run(JobKind.QUERY, job.request, self.config.timeout, options)
        self.evaluate_guard()
        if job.kind == KIND_EVALUATE_NO_QUERY:
            options["query_refusal"] = self.query_refusal()
        return await self.executor.run(JobKind.EVALUATE, job.request, self.config.timeout, options)

    async def _heartbeat_loop(self) -> None:
        last_prune = 0.0
        tick = 0
        while True:
            await asyncio.sleep(HEARTBEAT)
            tick += 1
            try:
                statuses = await asyncio.to_thread(self.store.heartbeat_jobs, list(self._running))
                for job_id, status in statuses.items():
                    task = self._running.get(job_id)
                    if task is not None and status in FINISHED:
                        task.cancel()  # cancelled through another replica
                if tick % 5 == 0:
                    await self._fail_orphans()
                if time.monotonic() - last_prune > PRUNE_EVERY:
                    last_prune = time.monotonic()
                    await self._prune()
            except StoreUnavailable as exc:
                log.warning("jobs: store unreachable: %s", exc.info)
            except Exception:
                log.exception("jobs: heartbeat failed")

    async def _fail_orphans(self) -> None:
        ids = await asyncio.to_thread(self.store.fail_orphaned_jobs, self._orphaned, STOPPED)
        for job_id in ids:
            log.warning("job %s was running when its server stopped: FAILURE", job_id)

    def _orphaned(self, claimed_by: str | None, heartbeat: float | None) -> bool:
        """Whether a started job's runner is gone (called in the store's transaction)."""
        if claimed_by == self.replica:
            return False
        return is_orphaned(self.me, claimed_by, heartbeat, time.time())
