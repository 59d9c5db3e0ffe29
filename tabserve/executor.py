"""The executor: a pool of long-lived worker processes that run user code.

Jobs are bytes in, bytes out: the server hands a worker the raw request body and writes the
worker's answer to the client without parsing either. A job that outlives its deadline gets
its worker's whole process group killed, and a fresh worker takes its place; so does a worker
that crashes. The queue in front of the pool is bounded: when it is full, callers get
``Overloaded`` at once instead of waiting behind a backlog.

It knows nothing of HTTP: errors are ``TabserveError``s, which the caller renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import logs
from .errors import Overloaded, ScriptTimeout, TabserveError, WorkerDied
from .protocol import PREFIX, ProtocolError, decode_header, decode_prefix, encode_prefix

log = logging.getLogger("tabserve.executor")

# Thread pools in numeric libraries would multiply across workers and oversubscribe the CPUs.
_SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

# The worker imports tabserve from wherever this server imported it, even when the server
# runs from a source tree, without putting that path into the environment scripts can see.
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from tabserve.worker import main; sys.exit(main())"
)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class PoolConfig:
    """What the pool needs to know; built from Settings at the edge."""

    workers: int
    request_limit: int
    memory_mb: int = 0
    queue_length: int = 128
    env_allow: Sequence[str] = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
    gzip_enabled: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    log_file: str | None = None  # None: the server's stderr
    start_timeout: float = 60.0
    command_prefix: Sequence[str] = ()  # e.g. a sandbox launcher put in front of python


@dataclass
class JobResult:
    """A worker's successful answer: the response body and what the worker said about it."""

    body: bytes
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoolStats:
    """Counters since start; read by the metrics collector, never reset."""

    started: int = 0
    restarts: int = 0  # replacement workers started
    timeouts: int = 0  # jobs answered 408, while running or still queued
    crashes: int = 0  # workers that died by themselves, busy or idle
    kills: int = 0  # workers retired for a running job's timeout or a crash
    rejected: int = 0  # jobs refused because the queue was full


def worker_environment(allow: Sequence[str], source: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: only allow-listed variables survive."""
    env = {name: source[name] for name in allow if name in source}
    for name, value in _SINGLE_THREADED.items():
        env.setdefault(name, value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if name == "SIGKILL":
            return "was killed (SIGKILL; often the kernel's out-of-memory killer)"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class WorkerProcess:
    """One worker: a child interpreter in its own process group, talking over two pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.jobs = 0
        self.context_generation = -1
        self.busy = False

    @classmethod
    async def spawn(cls, config: PoolConfig, env: Mapping[str, str]) -> WorkerProcess:
        worker_config = {
            "memory_mb": config.memory_mb,
            "request_limit": config.request_limit,
            "gzip_enabled": config.gzip_enabled,
            "log_level": config.log_level,
            "log_format": config.log_format,
            "log_file": config.log_file,
        }
        argv = [
            *config.command_prefix,
            sys.executable,
            "-c",
            _BOOTSTRAP,
            _PACKAGE_PARENT,
            orjson.dumps(worker_config).decode(),
        ]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,  # its own process group: a kill takes its children too
            limit=1 << 20,
        )
        worker = cls(process)
        try:
            header, _ = await asyncio.wait_for(worker._receive(), config.start_timeout)
        except (TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
            worker.kill()
            code = await worker.process.wait()
            raise RuntimeError(f"worker failed to start: it {describe_exit(code)}") from exc
        if not header.get("ready"):
            worker.kill()
            raise RuntimeError(f"worker sent an unexpected greeting: {header}")
        return worker

    async def _receive(self) -> tuple[dict[str, Any], bytes]:
        stdout = self.process.stdout
        assert stdout is not None
        header_length, payload_length = decode_prefix(await stdout.readexactly(PREFIX.size))
        header = decode_header(await stdout.readexactly(header_length))
        payload = await stdout.readexactly(payload_length) if payload_length else b""
        return header, payload

    async def call(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        stdin = self.process.stdin
        assert stdin is not None
        self.jobs += 1
        stdin.write(encode_prefix(header, len(payload)))
        stdin.write(payload)
        await stdin.drain()
        return await self._receive()

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def stop(self, grace: float = 2.0) -> None:
        """Close the pipe (the worker exits by itself), then kill whatever is left."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            pass
        self.kill()  # also reaps anything the script left behind in the group
        await self.process.wait()


class Executor:
    """The pool. ``await start()``, then ``await run(...)`` from any coroutine."""

    def __init__(self, config: PoolConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = worker_environment(config.env_allow, os.environ if environ is None else environ)
        self.stats = PoolStats()
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        self._workers: set[WorkerProcess] = set()
        self._waiting = 0
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._context: dict[str, Any] = {}
        self._context_generation = 0

    def set_context(self, context: dict[str, Any]) -> None:
        """Data every worker must see before its next job (e.g. the deployed endpoints).

        It travels in the header of a worker's next job, so each job sees one consistent
        version of it: the one current when the job was dispatched.
        """
        self._context = context
        self._context_generation += 1

    @property
    def queued(self) -> int:
        return self._waiting

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def alive(self) -> int:
        return sum(1 for worker in self._workers if worker.alive)

    @property
    def pids(self) -> list[int]:
        return sorted(worker.pid for worker in self._workers)

    async def start(self) -> None:
        """Start every worker and wait until each has said it is ready."""
        workers = await asyncio.gather(
            *(WorkerProcess.spawn(self.config, self.env) for _ in range(self.config.workers)),
            return_exceptions=True,
        )
        failures = [w for w in workers if isinstance(w, BaseException)]
        for worker in workers:
            if isinstance(worker, WorkerProcess):
                self._adopt(worker)
        if failures:
            await self.close()
            raise failures[0]

    def _adopt(self, worker: WorkerProcess) -> None:
        self.stats.started += 1
        self._workers.add(worker)
        self._idle.put_nowait(worker)
        self._background(self._watch(worker))

    def _background(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: WorkerProcess) -> None:
        """Replace a worker that dies while idle, so the pool heals without waiting for a job."""
        code = await worker.process.wait()
        if self._closing or worker.busy or worker not in self._workers:
            return  # shutting down, or already handled by run() or _retire
        self.stats.crashes += 1
        self.stats.kills += 1
        log.error("idle worker %d %s; replacing it", worker.pid, describe_exit(code))
        self._retire(worker)

    async def run(
        self, kind: str, payload: bytes, timeout: float, options: Mapping[str, Any] | None = None
    ) -> JobResult:
        """Run one job within ``timeout`` seconds, queueing included.

        Raises ScriptTimeout, WorkerDied, Overloaded, or the TabserveError the worker sent.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        enqueued = time.perf_counter()
        worker = await self._acquire(deadline, timeout)
        queue_ms = (time.perf_counter() - enqueued) * 1000
        header = {"kind": kind, "call_id": logs.call_id.get(), **(options or {})}
        if worker.context_generation != self._context_generation:
            header["context"] = self._context
            worker.context_generation = self._context_generation
        self._busy += 1
        worker.busy = True
        try:
            reply, body = await asyncio.wait_for(
                worker.call(header, payload), max(deadline - loop.time(), 0)
            )
        except TimeoutError:
            self.stats.timeouts += 1
            self.stats.kills += 1
            log.warning("job timed out after %.1f s: killing worker %d", timeout, worker.pid)
            self._retire(worker)
            raise ScriptTimeout.after(timeout) from None
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.stats.crashes += 1
            self.stats.kills += 1
            code = await self._exit_code(worker)
            self._retire(worker)
            reason = describe_exit(code)
            log.error("worker %d %s while running a job", worker.pid, reason)
            raise WorkerDied(info=f"The worker process running this request {reason}.") from exc
        finally:
            self._busy -= 1
            worker.busy = False
        if reply.pop("recycle", False):
            self._retire(worker)
        else:
            self._idle.put_nowait(worker)
        reply.update(worker_pid=worker.pid, queue_ms=round(queue_ms, 3))
        if reply.get("status", 200) != 200:
            error = TabserveError.from_wire(reply)
            error.meta = reply
            raise error
        return JobResult(body, reply)

    async def _acquire(self, deadline: float, timeout: float) -> WorkerProcess:
        if self._closing:
            raise Overloaded("Server is shutting down")
        if self._idle.empty() and self._waiting >= self.config.queue_length:
            self.stats.rejected += 1
            raise Overloaded(info=f"{self._waiting} requests are already waiting for a worker")
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            while True:
                try:
                    worker = await asyncio.wait_for(
                        self._idle.get(), max(deadline - loop.time(), 0)
                    )
                except TimeoutError:
                    self.stats.timeouts += 1
                    raise ScriptTimeout.after(timeout) from None
                if worker.alive:
                    return worker
                if worker in self._workers:
                    # It died while idle and _watch has not run yet: replace it here.
                    self.stats.crashes += 1
                    self.stats.kills += 1
                    self._retire(worker)
        finally:
            self._waiting -= 1

    async def _exit_code(self, worker: WorkerProcess) -> int | None:
        try:
            return await asyncio.wait_for(worker.process.wait(), 2.0)
        except TimeoutError:
            return None

    def _retire(self, worker: WorkerProcess) -> None:
        """Kill ``worker`` and start a replacement in the background."""
        worker.kill()
        self._workers.discard(worker)
        if not self._closing:
            self._background(self._replace())

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                worker = await WorkerProcess.spawn(self.config, self.env)
            except (RuntimeError, OSError) as exc:
                log.error("could not start a replacement worker: %s; retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if self._closing:
                await worker.stop()
                return
            self.stats.restarts += 1
            self._adopt(worker)
            return

    async def close(self, grace: float = 2.0) -> None:
        """Stop every worker; anything still running is killed after ``grace`` seconds."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        workers = list(self._workers)
        self._workers.clear()
        await asyncio.gather(*(w.stop(grace) for w in workers), return_exceptions=True)
