"""The executor: a pool of long-lived worker processes that run user code.

Jobs are bytes in, bytes out: the server hands a worker the raw request body and writes the
worker's answer to the client without parsing either. Workers come from a launcher
(``launcher.py``: fresh interpreters, forks of the zygote, bubblewrap sandboxes), which the
pool does not tell apart. A job that outlives its deadline gets its worker killed with what
its script started (a fresh worker's process group; a zygote's worker's whole process tree;
a bubblewrap worker's PID namespace), and a new worker takes its place; so does a worker
that crashes. The queue in front of the pool is
bounded: when it is full, callers get ``Overloaded`` at once instead of waiting behind a
backlog. With several front-end processes (``frontends.py``) the pool lives in the master,
which *leases* workers: ``lease`` takes one through the same queue and stops reading its
socket, the front end talks to it over duplicates of its sockets, and ``give_back`` or
``retire_leased`` ends the lease.

It knows nothing of HTTP: errors are ``TabserveError``s, which the caller renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from .. import fdpass, logs
from ..config import WORKER_ENV
from ..errors import Overloaded, ScriptTimeout, TabserveError, WorkerDied
from ..protocol import (
    PREFIX,
    Context,
    JobHeader,
    JobKind,
    Payload,
    ProtocolError,
    ReplyHeader,
    Telemetry,
    decode_header,
    decode_prefix,
    encode_prefix,
    payload_length,
)
from .launcher import (
    FRESH,
    ZYGOTE,
    BubblewrapLauncher,
    FreshLauncher,
    Launched,
    Launcher,
    ZygoteLauncher,
)

log = logging.getLogger("tabserve.executor")

# Thread pools in numeric libraries would multiply across workers and oversubscribe the CPUs.
SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

# How many bytes one read of a worker's socket takes at most.
_READ_SIZE = 256 * 1024
# Buffers per sendmsg: a body arrives in chunks of up to 1 MiB (fewer when reads come short),
# and the kernel takes at most IOV_MAX (1,024 on Linux) in one call.
_IOV_PARTS = 512
# A reply payload at least this large is received into a bytearray of its own and handed on
# as it is (``JobResult.body`` is then a bytearray); smaller ones are copied out as bytes.
DIRECT_PAYLOAD = 1024 * 1024
_Read = TypeVar("_Read", bytes, int)  # a read of a worker's socket: recv's bytes, recv_into's count


@dataclass(frozen=True)
class PoolConfig:
    """What the pool needs to know; built from Settings at the edge."""

    workers: int
    request_limit: int
    memory_mb: int = 0
    queue_length: int = 128
    env_allow: Sequence[str] = WORKER_ENV  # TABSERVE_WORKER_ENV's default
    gzip_enabled: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    log_file: str | None = None  # None: the server's stderr
    start_timeout: float = 60.0
    command_prefix: Sequence[str] = ()  # e.g. a sandbox launcher put in front of python
    launch: str = FRESH  # FRESH or ZYGOTE (a command_prefix always launches fresh)
    preload: Sequence[str] = ()  # modules workers import before they say they are ready
    gc_freeze: bool = True  # the zygote freezes its heap before forking (shared pages)
    # Applied by the worker itself before it says it is ready (see worker.main.confine):
    drop_to: tuple[int, int] | None = None  # (uid, gid) to switch to; None keeps the user
    limits: Mapping[str, int] = field(default_factory=dict)  # fsize (MiB), nofile, nproc
    cpu_seconds: int = 0  # RLIMIT_CPU backstop per job
    archive_dir: str = ""  # kept open across the user switch (see worker.main.confine)


@dataclass
class JobResult:
    """A worker's successful answer: the response body and what was measured about it."""

    body: bytes | bytearray  # a bytearray when large (``DIRECT_PAYLOAD``): not to be changed
    meta: Telemetry = field(default_factory=lambda: Telemetry())
    fds: list[int] = field(default_factory=list)  # tables the worker handed back; caller closes


@dataclass
class PoolStats:
    """Counters since start; read by the metrics collector, never reset."""

    started: int = 0
    restarts: int = 0  # replacement workers started
    timeouts: int = 0  # jobs answered 408, while running or still queued
    crashes: int = 0  # workers that died by themselves, busy or idle
    kills: int = 0  # workers retired for a running job's timeout or a crash
    rejected: int = 0  # jobs refused because the queue was full


def worker_config(config: PoolConfig) -> dict[str, Any]:
    """What a worker process is told at start (its argv, or the zygote's): no secrets."""
    return {
        "memory_mb": config.memory_mb,
        "cpu_seconds": config.cpu_seconds,
        "limits": dict(config.limits),
        "drop_to": config.drop_to,
        "archive_dir": config.archive_dir,
        "request_limit": config.request_limit,
        "gzip_enabled": config.gzip_enabled,
        "log_level": config.log_level,
        "log_format": config.log_format,
        "log_file": config.log_file,
        "preload": list(config.preload),
        "gc_freeze": config.gc_freeze,
    }


def make_launcher(config: PoolConfig, env: Mapping[str, str]) -> Launcher:
    """The launcher ``config`` asks for. Bubblewrap workers are always fresh interpreters,
    each in a sandbox of its own (docs/architecture.md says why)."""
    settings = worker_config(config)
    if config.command_prefix:
        return BubblewrapLauncher(settings, env, config.command_prefix)
    if config.launch == ZYGOTE:
        return ZygoteLauncher(settings, env, config.start_timeout)
    return FreshLauncher(settings, env)


def job_header(kind: JobKind, options: Mapping[str, Any] | None) -> JobHeader:
    """The header of a job: its kind, the request's call id, the kind's own fields."""
    header: JobHeader = {"kind": kind, "call_id": logs.call_id.get()}
    header.update(options or {})  # type: ignore[typeddict-item]
    return header


def job_result(
    reply: ReplyHeader,
    body: bytes | bytearray,
    worker_pid: int,
    queue_ms: float,
    fds: Sequence[int] = (),
) -> JobResult:
    """What a caller of ``run`` gets for a worker's reply: the result (with the descriptors
    the worker handed back), or the error raised (closing them; the error carries the
    telemetry, for the access log)."""
    telemetry: Telemetry = {
        **reply.get("telemetry", {}),
        "worker_pid": worker_pid,
        "queue_ms": round(queue_ms, 3),
    }
    if reply["status"] != 200:
        fdpass.close_all(fds)
        error = TabserveError.from_wire(dict(reply))
        error.meta = dict(telemetry)
        raise error
    return JobResult(body, telemetry, list(fds))


async def call_or_end(
    worker: WorkerProcess,
    header: JobHeader,
    payload: Payload,
    deadline: float,
    timeout: float,
    fds: Sequence[int],
    context: bytes | None,
    *,
    timed_out: Callable[[], None],
    died: Callable[[], Awaitable[str]],
    cancelled: Callable[[], None],
) -> tuple[ReplyHeader, bytes | bytearray, list[int]]:
    """``worker.call``, and what a job that ends without a reply means, for every pool that
    runs jobs (``Executor.run``, and a front end's ``LeasedPool.run``), so they cannot drift.

    Past ``deadline``: ``timed_out()`` (the worker must go), then ScriptTimeout for
    ``timeout``. The worker lost (its socket failed or ended): ``await died()``, which ends
    it and says why it died, then WorkerDied. Cancelled (or any other error) mid-job:
    ``cancelled()``, since the worker's late reply would be read as the next job's, and the
    error goes on.
    """
    try:
        return await worker.call(header, payload, deadline, fds, context)
    except asyncio.TimeoutError:
        timed_out()
        raise ScriptTimeout.after(timeout) from None
    except (ProtocolError, ConnectionError) as exc:
        reason = await died()
        raise WorkerDied(info=f"The worker process running this request {reason}.") from exc
    except BaseException:
        cancelled()
        raise


def worker_environment(allow: Sequence[str], source: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: only allow-listed variables survive."""
    env = {name: source[name] for name in allow if name in source}
    for name, value in SINGLE_THREADED.items():
        env.setdefault(name, value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_exit(returncode: int | None, launcher: bool = False) -> str:
    if returncode is None:
        return "stopped answering"
    if launcher and 128 < returncode < 128 + signal.NSIG:
        # A launcher such as bwrap reports its child's death by signal N as exit 128 + N.
        return describe_exit(128 - returncode)
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
    """One worker, as a launcher started it, and the frames on its socket.

    The socket is driven with ``loop.add_reader``: one callback per chunk turns bytes into
    whole frames, and one future per reply waits for the next; writes go out with one
    ``sendmsg`` (the rest, if the socket is full, when it becomes writable).
    """

    def __init__(self, launched: Launched, reading: bool = True) -> None:
        self.launched = launched
        self.pid: int = launched.pid
        self.channel = launched.channel
        # Tables (sealed memfds) go to and come back from the worker over this socket pair,
        # beside the frames; each batch is tagged with its job's number (fdpass.py).
        self.fd_channel = launched.fd_channel
        self.exited = launched.exited
        self.context_generation = -1
        self.busy = False
        self._fd_seq = 0
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        # A frame with a large payload, while it arrives: (header, its buffer, bytes filled).
        self._large: tuple[dict[str, Any], bytearray, int] | None = None
        self._frames: deque[tuple[dict[str, Any], bytes | bytearray]] = deque()
        self._waiter: asyncio.Future[tuple[dict[str, Any], bytes | bytearray]] | None = None
        self._failure: Exception | None = None
        self._unsent: deque[memoryview] = deque()
        self._open = True
        # Off while another process holds the worker on lease (front ends, frontends.py): two
        # readers of one socket would split its frames between them.
        self._reading = reading
        if reading:
            self._loop.add_reader(self.channel, self._readable)
        self.exited.add_done_callback(self._on_exit)

    @classmethod
    async def spawn(cls, launcher: Launcher, start_timeout: float) -> WorkerProcess:
        worker = cls(await launcher.launch())
        try:
            header, _ = await asyncio.wait_for(worker.next_frame(), start_timeout)
        except (asyncio.TimeoutError, ProtocolError) as exc:
            worker.kill()
            code = await worker.wait()
            raise RuntimeError(
                f"worker failed to start: it {describe_exit(code, launcher.wrapped)}"
            ) from exc
        except BaseException:
            worker.kill()  # cancelled while starting (shutdown): leave no orphan behind
            raise
        if not header.get("ready"):
            worker.kill()
            raise RuntimeError(f"worker sent an unexpected greeting: {header}")
        return worker

    # -- the frames ------------------------------------------------------------------------

    def _readable(self) -> bool:
        """Read what the socket holds; False when there was nothing (or it ended)."""
        if self._large is not None:
            return self._read_large()
        data = self._read_socket(lambda: self.channel.recv(_READ_SIZE))
        if data is None:
            return False
        self._buffer += data
        try:
            while len(self._buffer) >= PREFIX.size:
                header_length, payload_length = decode_prefix(self._buffer[: PREFIX.size])
                start = PREFIX.size + header_length
                end = start + payload_length
                if len(self._buffer) < end:
                    if payload_length >= DIRECT_PAYLOAD and len(self._buffer) >= start:
                        self._start_large(decode_header(self._buffer[PREFIX.size : start]), start)
                    break
                header = decode_header(self._buffer[PREFIX.size : PREFIX.size + header_length])
                with memoryview(self._buffer) as view:  # one copy, not a slice and a copy
                    payload = bytes(view[PREFIX.size + header_length : end])
                del self._buffer[:end]
                self._frames.append((header, payload))
                self._wake()
        except (ProtocolError, ValueError) as exc:
            self._fail(ProtocolError(f"worker sent a malformed frame: {exc}"))
            return False
        return True

    def _read_socket(self, read: Callable[[], _Read]) -> _Read | None:
        """One ``read`` of the worker's socket: what it gave, or None when there was nothing
        yet, or the socket failed or ended (the worker is then failed)."""
        try:
            got = read()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._fail(ProtocolError(f"the worker's socket failed: {exc}"))
            return None
        if not got:
            self._fail(ProtocolError("the worker closed its socket"))
            return None
        return got

    def _start_large(self, header: dict[str, Any], start: int) -> None:
        """A large payload is read straight into a buffer of its own, which is handed on as
        it is: no growing of the read buffer, and no copy out of it (18 MB for a 1M-row
        answer). Everything buffered past ``start`` belongs to it (the frame is incomplete)."""
        _, payload_length = decode_prefix(self._buffer[: PREFIX.size])
        payload = bytearray(payload_length)
        got = len(self._buffer) - start
        with memoryview(self._buffer) as view:
            payload[:got] = view[start:]
        self._buffer.clear()
        self._large = (header, payload, got)

    def _read_large(self) -> bool:
        assert self._large is not None
        header, payload, filled = self._large
        with memoryview(payload) as view:
            count = self._read_socket(lambda: self.channel.recv_into(view[filled:]))
        if count is None:
            return False
        filled += count
        if filled < len(payload):
            self._large = (header, payload, filled)
            return True
        self._large = None
        self._frames.append((header, payload))
        self._wake()
        return True

    def _on_exit(self, _: object) -> None:
        # Whatever it wrote before it exited is in the socket by now: read that first, so a
        # reply sent just before a recycling exit is not lost.
        while self._open and self._reading and self._readable():
            pass
        self._fail(ProtocolError("the worker exited"))

    def _fail(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = error
        self._stop_io()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._frames:
            waiter.set_result(self._frames.popleft())
        elif self._failure is not None:
            waiter.set_exception(self._failure)

    def next_frame(self) -> asyncio.Future[tuple[dict[str, Any], bytes | bytearray]]:
        self._waiter = self._loop.create_future()
        self._wake()
        return self._waiter

    def _write(self, parts: list[bytes]) -> None:
        if self._failure is not None:
            return  # the reply's future fails with it
        if self._unsent or len(parts) > _IOV_PARTS:
            self._unsent.extend(memoryview(part) for part in parts)
            self._writable()
            if self._unsent:
                self._loop.add_writer(self.channel, self._writable)
            return
        try:
            sent = self.channel.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(ProtocolError(f"cannot write to the worker: {exc}"))
            return
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self._unsent.append(memoryview(part)[sent:])
            sent = 0
        if self._unsent:
            self._loop.add_writer(self.channel, self._writable)

    def _writable(self) -> None:
        try:
            sent = self.channel.sendmsg(list(itertools.islice(self._unsent, _IOV_PARTS)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(ProtocolError(f"cannot write to the worker: {exc}"))
            return
        while self._unsent and sent >= len(self._unsent[0]):
            sent -= len(self._unsent.popleft())
        if self._unsent and sent:
            self._unsent[0] = self._unsent[0][sent:]
        if not self._unsent:
            self._loop.remove_writer(self.channel)

    def _stop_io(self) -> None:
        if self._open:
            self._open = False
            self._reading = False
            self._loop.remove_reader(self.channel)
            self._loop.remove_writer(self.channel)
            self._unsent.clear()

    def pause(self) -> None:
        """Stop reading its socket: another process talks to it now (a lease)."""
        if self._open and self._reading:
            self._reading = False
            self._loop.remove_reader(self.channel)

    def resume(self) -> None:
        """Read its socket again (the lease came back)."""
        if self._open and not self._reading:
            self._reading = True
            self._loop.add_reader(self.channel, self._readable)

    # -- jobs --------------------------------------------------------------------------------

    async def call(
        self,
        header: JobHeader,
        payload: Payload,
        deadline: float,
        fds: Sequence[int] = (),
        context: bytes | None = None,
    ) -> tuple[ReplyHeader, bytes | bytearray, list[int]]:
        """Send one job (after ``context``, an encoded endpoint table, if given) and wait for
        its reply until ``deadline`` (loop time): TimeoutError.

        ``fds`` go with the job (the worker gets duplicates); the descriptors the worker sends
        back are returned, owned by the caller. A payload given as a list of chunks is emptied
        as it is handed to the socket's writer, so that each chunk is freed once it is sent
        rather than held until the reply (40 MB through a 1M-row call's computation).
        """
        self._fd_seq += 1
        header["fd_seq"] = self._fd_seq  # the worker tags descriptors it sends back with it
        if fds:
            header["fds"] = len(fds)
            try:
                # One small message per job into an empty queue: it never blocks.
                fdpass.send_message(self.fd_channel, {"seq": self._fd_seq}, fds)
            except OSError as exc:
                raise ProtocolError(f"cannot pass descriptors to the worker: {exc}") from exc
        reply = self.next_frame()
        # A timer on the reply future, rather than wait_for, which costs a task per job.
        timer = self._loop.call_at(deadline, _expire, reply)
        try:
            parts = []
            if context is not None:
                parts += [encode_prefix({"kind": JobKind.CONTEXT}, len(context)), context]
            parts.append(encode_prefix(header, payload_length(payload)))
            if isinstance(payload, list):
                parts.extend(payload)
                payload.clear()  # handed over: see the docstring
            else:
                parts.append(payload)
            self._write(parts)
            # What is not sent yet is held by the writer; each chunk goes once it is sent.
            parts.clear()
            answer, body = await reply
        finally:
            timer.cancel()
        return answer, body, self._returned_fds(answer)  # type: ignore[return-value]

    def _returned_fds(self, answer: dict[str, Any]) -> list[int]:
        """The descriptors the worker sent before its reply, which announces how many.

        The worker writes them to the socket before it writes its reply to the pipe, so they
        are queued by now; a message tagged for another job (something a script left
        running) is discarded, descriptors closed.
        """
        wanted = answer.pop("fds", 0)
        seq = answer.pop("fd_seq", None)
        if not wanted:
            return []
        while True:
            try:
                received = fdpass.receive_message(self.fd_channel)
            except (BlockingIOError, fdpass.FdProtocolError) as exc:
                raise ProtocolError(f"the worker announced {wanted} descriptors: {exc}") from None
            if received is None:
                raise ProtocolError("the worker closed its descriptor channel")
            message, fds = received
            if message.get("seq") == seq == self._fd_seq and len(fds) == wanted:
                return fds
            fdpass.close_all(fds)

    # -- life and death ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def wait(self) -> int | None:
        return await asyncio.shield(self.exited)

    def kill(self) -> None:
        self.launched.kill()
        self._fail(ProtocolError("the worker was killed"))
        self.channel.close()
        self.fd_channel.close()  # descriptors still queued in it are released with it

    async def stop(self, grace: float = 2.0) -> None:
        """End its input (the worker exits by itself), then kill whatever is left."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_WR)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except asyncio.TimeoutError:
            pass
        self.kill()  # also reaps anything the script left behind in the group
        await self.wait()


# asyncio.TimeoutError throughout: on Python 3.10 it is not yet the builtin TimeoutError
# (they are one class from 3.11), and wait_for raises the asyncio one.
def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class Executor:
    """The pool. ``await start()``, then ``await run(...)`` from any coroutine."""

    def __init__(
        self,
        config: PoolConfig,
        environ: Mapping[str, str] | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.config = config
        self.env = worker_environment(config.env_allow, os.environ if environ is None else environ)
        self.launcher = launcher or make_launcher(config, self.env)
        self.stats = PoolStats()
        # Idle workers, and callers waiting for one (oldest first). A plain deque of futures,
        # not asyncio.Queue + wait_for, whose timeout can race a get() and lose a worker.
        self._idle: deque[WorkerProcess] = deque()
        self._waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self._workers: set[WorkerProcess] = set()
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._context = orjson.dumps(Context(endpoints={}))
        self._context_generation = 0

    def set_context(self, context: Context) -> None:
        """What every worker must see before its next job: the deployed endpoints.

        It is sent, encoded once, in a ``context`` frame just before a worker's next job, so
        each job sees one consistent version of it: the one current when the job was
        dispatched.
        """
        self._context = orjson.dumps(context)
        self._context_generation += 1

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

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
    def members(self) -> list[WorkerProcess]:
        """The workers of the pool now (busy, idle or leased)."""
        return list(self._workers)

    @property
    def pids(self) -> list[int]:
        return sorted(worker.pid for worker in self._workers)

    async def start(self) -> None:
        """Start every worker and wait until each has said it is ready."""
        await self.launcher.start()
        workers = await asyncio.gather(
            *(self._spawn() for _ in range(self.config.workers)),
            return_exceptions=True,
        )
        failures = [w for w in workers if isinstance(w, BaseException)]
        for worker in workers:
            if isinstance(worker, WorkerProcess):
                self._adopt(worker)
        if failures:
            await self.close()
            raise failures[0]

    def _spawn(self) -> Awaitable[WorkerProcess]:
        return WorkerProcess.spawn(self.launcher, self.config.start_timeout)

    def _adopt(self, worker: WorkerProcess) -> None:
        self.stats.started += 1
        self._workers.add(worker)
        # A callback, not a task per worker: replace it if it dies while idle, so the pool
        # heals (and readiness recovers) without waiting for a job to find the corpse.
        worker.exited.add_done_callback(lambda _: self._exited(worker))
        self._release(worker)

    def _exited(self, worker: WorkerProcess) -> None:
        if self._closing or worker.busy or worker not in self._workers:
            return  # shutting down, or already handled by run() or _retire
        self.stats.crashes += 1
        self.stats.kills += 1
        code = worker.returncode
        reason = describe_exit(code, self.launcher.wrapped)
        log.error("idle worker %d %s; replacing it", worker.pid, reason)
        self._retire(worker)

    def _release(self, worker: WorkerProcess) -> None:
        """Hand ``worker`` to the oldest caller still waiting, or put it back as idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    async def run(
        self,
        kind: JobKind,
        payload: Payload,
        timeout: float,
        options: Mapping[str, Any] | None = None,
        fds: Sequence[int] = (),
    ) -> JobResult:
        """Run one job within ``timeout`` seconds, queueing included.

        ``fds`` (sealed tables) go with the job; the caller still owns and closes them.
        Raises ScriptTimeout, WorkerDied, Overloaded, or the TabserveError the worker sent.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        enqueued = time.perf_counter()
        worker = await self._acquire(deadline, timeout)
        queue_ms = (time.perf_counter() - enqueued) * 1000
        header = job_header(kind, options)
        context = None
        if worker.context_generation != self._context_generation:
            context = self._context
            worker.context_generation = self._context_generation
        self._busy += 1
        worker.busy = True

        def timed_out() -> None:
            self.stats.timeouts += 1
            self.stats.kills += 1
            log.warning("job timed out after %.1f s: killing worker %d", timeout, worker.pid)
            self._retire(worker)

        async def died() -> str:
            self.stats.crashes += 1
            self.stats.kills += 1
            code = await self._exit_code(worker)
            self._retire(worker)
            reason = describe_exit(code, self.launcher.wrapped)
            log.error("worker %d %s while running a job", worker.pid, reason)
            return reason

        try:
            reply, body, returned = await call_or_end(
                worker,
                header,
                payload,
                deadline,
                timeout,
                fds,
                context,
                timed_out=timed_out,
                died=died,
                cancelled=lambda: self._retire(worker),
            )
        finally:
            self._busy -= 1
            worker.busy = False
        if reply.get("recycle"):
            self._retire(worker)
        else:
            self._release(worker)
        return job_result(reply, body, worker.pid, queue_ms, returned)

    # -- leases: a front-end process runs the job itself (frontends.py) --------------------

    async def lease(self, timeout: float) -> WorkerProcess:
        """An idle worker for another process to talk to directly, waiting in the same queue
        as ``run``'s callers; this process stops reading its socket until ``give_back`` or
        ``retire_leased``. Raises Overloaded or ScriptTimeout as ``run`` does."""
        deadline = asyncio.get_running_loop().time() + timeout
        worker = await self._acquire(deadline, timeout)
        self._busy += 1
        worker.busy = True
        worker.pause()
        return worker

    def give_back(self, worker: WorkerProcess, recycle: bool = False) -> None:
        """End a lease whose job was answered: the worker is idle again (or recycled)."""
        self._busy -= 1
        worker.busy = False
        if worker not in self._workers:
            return
        if recycle:  # it said it would exit after this job (it may have already)
            self._retire(worker)
        elif not worker.alive:
            self.stats.crashes += 1
            self.stats.kills += 1
            log.error("worker %d %s", worker.pid, describe_exit(worker.returncode))
            self._retire(worker)
        else:
            worker.resume()
            self._release(worker)

    def retire_leased(self, worker: WorkerProcess, reason: str) -> None:
        """End a lease whose job did not end with a reply: kill the worker, start another.

        ``reason``: ``timeout`` (counted as a timeout), ``crash`` (its worker died), or
        anything else (a job cancelled mid-way: not counted, as in ``run``)."""
        self._busy -= 1
        worker.busy = False
        if worker not in self._workers:
            return
        if reason in ("timeout", "crash"):
            self.stats.kills += 1
            if reason == "timeout":
                self.stats.timeouts += 1
            else:
                self.stats.crashes += 1
        self._retire(worker)

    async def exit_code(self, worker: WorkerProcess) -> int | None:
        """``worker``'s exit status, waiting up to 2 s for it to exit (None if it does not)."""
        return await self._exit_code(worker)

    async def _acquire(self, deadline: float, timeout: float) -> WorkerProcess:
        if self._closing:
            raise Overloaded("Server is shutting down")
        while True:
            worker = self._idle.popleft() if self._idle else await self._wait(deadline, timeout)
            if worker.alive:
                return worker
            if worker in self._workers:
                # It died while idle and _exited has not run yet: replace it here.
                self.stats.crashes += 1
                self.stats.kills += 1
                self._retire(worker)

    async def _wait(self, deadline: float, timeout: float) -> WorkerProcess:
        if self.queued >= self.config.queue_length:
            self.stats.rejected += 1
            raise Overloaded(info=f"{self.queued} requests are already waiting for a worker")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WorkerProcess] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            raise ScriptTimeout.after(timeout) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as we were cancelled
            raise
        finally:
            timer.cancel()

    async def _exit_code(self, worker: WorkerProcess) -> int | None:
        try:
            return await asyncio.wait_for(worker.wait(), 2.0)
        except asyncio.TimeoutError:
            return None

    def _retire(self, worker: WorkerProcess) -> None:
        """Kill ``worker`` and start a replacement in the background."""
        worker.kill()
        self._workers.discard(worker)
        if not self._closing:
            task = asyncio.create_task(self._replace())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                worker = await self._spawn()
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
        while self._waiters:  # callers still queued get their answer now, not at their deadline
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Overloaded("Server is shutting down"))
        workers = list(self._workers)
        self._workers.clear()
        await asyncio.gather(*(w.stop(grace) for w in workers), return_exceptions=True)
        await self.launcher.close()
