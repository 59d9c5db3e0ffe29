"""Several front-end processes sharing one worker pool (``TABSERVE_PROCESSES`` >= 2).

The process started as ``tabserve`` becomes the *master*. It starts the pool exactly as one
process would (``start_pool``: launcher and zygote first, before any secret is read, then
the sandbox self-check), binds the listening sockets once, and starts the front ends: fresh
interpreters that inherit the listening sockets and one lease channel each (a
``SOCK_SEQPACKET`` pair, ``fdpass`` messages). The master serves no HTTP. It supervises the
front ends (one that dies is started again), leases them workers, relays the few things
that must be shared (authentication failures, SIGHUP) and shuts everything down in order.

Each front end builds its own services on the shared store, as a replica would, and serves
HTTP on the inherited sockets, accepting one connection per wake-up so that they share them.

Workers are *leased*, not relayed. A front end sends ``acquire``; the master takes a worker
from its pool's queue (one FIFO for every front end, so no request waits behind a busy
worker while another is idle), stops reading that worker's socket, and answers ``leased``
with the worker's id and pid and, the first time this front end gets it, duplicates of the
worker's two sockets. The front end then talks to the worker directly, with the frames of
``protocol.py``, and sends ``release`` (recycle asked? which endpoint table the worker now
holds?) once the reply is in. A request given up on while it waits sends ``cancel``: the
master drops its ``acquire`` from the queue at once (a worker leased for it meanwhile comes
straight back with ``release``). A job that times out or loses its worker is ``kill``: the
master retires the worker (its launcher kills everything the script started) and starts a
replacement. A front end that dies with leases has those workers retired the same way.

The endpoint table a worker holds is named by a digest of its encoded bytes, not by a
per-process counter, so any front end knows whether a leased worker needs its table sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, TextIO

import orjson

from .. import fdpass, logs
from ..config import Settings
from ..errors import Overloaded, ScriptTimeout, TabserveError, WorkerDied
from ..protocol import Context, JobKind, Payload
from .executor import (
    Executor,
    JobResult,
    PoolConfig,
    PoolStats,
    WorkerProcess,
    call_or_end,
    describe_exit,
    job_header,
    job_result,
)
from .launcher import PACKAGE_PARENT
from .metrics import process_gone

log = logging.getLogger("tabserve.frontends")

# The environment variable that makes a fresh interpreter a front end: JSON naming the
# descriptors it inherited. Removed from its environment as soon as it is read.
MARKER = "TABSERVE_FRONTEND"
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from tabserve.server.frontends import frontend_main; sys.exit(frontend_main())"
)
# How often the master tells every front end the pool's state (readiness, /metrics, status).
_POOL_EVERY = 0.5
# A front end that dies is started again after this long (doubling while it keeps dying).
_RESTART_DELAY = 0.5


class FrontEndFailed(RuntimeError):
    """A front-end process could not start; what it printed says why."""


def _exit_status(process: subprocess.Popen[bytes], within: float = 2.0) -> int | None:
    """The exit status of a front end that stopped reading its stdin; None (and killed) if
    it is still running after ``within`` seconds."""
    try:
        return process.wait(within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def context_digest(encoded: bytes) -> str:
    """The name of an encoded endpoint table, as the master and every front end compute it."""
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


# -- the master ------------------------------------------------------------------------------


class _FrontEnd:
    """One front-end process as the master sees it: process, lease channel, leases."""

    def __init__(self, master: Master, index: int) -> None:
        self.master = master
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.ready = False
        self.started_once = False
        self.exited: asyncio.Future[int | None] | None = None
        self.leases: dict[int, WorkerProcess] = {}
        self.held: set[int] = set()  # workers whose sockets it has duplicates of
        self._tasks: set[asyncio.Task[None]] = set()
        self._acquiring: dict[int, asyncio.Task[None]] = {}  # acquire id -> its lease
        self._delay = _RESTART_DELAY

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        master = self.master
        loop = asyncio.get_running_loop()
        ours, theirs = fdpass.socket_pair()
        listen = [sock.fileno() for sock in master.sockets]
        marker = {"listen": listen, "lease": theirs.fileno(), "index": self.index}
        env = {**os.environ, MARKER: orjson.dumps(marker).decode()}
        env.update(master.frontend_env)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, PACKAGE_PARENT],
                stdin=subprocess.PIPE,
                env=env,
                pass_fds=(*listen, theirs.fileno()),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert self.process.stdin is not None
        # What it serves with: the settings and the self-check's verdict, from this process
        # (a pipe of our own: nothing else can write to it).
        try:
            with self.process.stdin as pipe:
                pipe.write(master.frontend_payload)
        except (BrokenPipeError, ConnectionResetError):
            # Gone before it read them (an interpreter that could not start): a start that
            # failed, said with its exit status, rather than a broken pipe.
            ours.close()
            code = _exit_status(self.process)
            raise FrontEndFailed(
                f"front-end process {self.index} {describe_exit(code)} before reading its "
                "start-up data"
            ) from None
        ours.setblocking(False)
        self.sock = ours
        self.ready = False
        self.exited = loop.create_future()
        loop.add_reader(ours, self._readable)
        pidfd = os.pidfd_open(self.process.pid)
        loop.add_reader(pidfd, self._reap, pidfd)
        self.send(master.pool_state())

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> bool:
        if self.sock is None:
            return False
        try:
            fdpass.send_message(self.sock, message, fds)
        except OSError as exc:
            # A lost answer would leave one of its callers waiting for ever: a front end that
            # cannot be told is killed, and started again with nothing leased (_reap).
            log.error("front end %d is not reading its lease channel (%s): killing it",
                      self.index, exc)  # fmt: skip
            self.signal(signal.SIGKILL)
            return False
        return True

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.exited is not None and not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            for message, fds in fdpass.receive_ready(self.sock):
                fdpass.close_all(fds)  # front ends never send descriptors
                try:
                    self._handle(message)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("front end %d sent a malformed message %r: %s", self.index,
                              message, exc)  # fmt: skip
        except fdpass.ChannelClosed as closed:
            if closed.error is not None:
                log.error("front end %d sent something unreadable: %s", self.index, closed.error)
            self._lost()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "acquire":
            timeout = float(message["timeout"])
            remaining = timeout
            if "deadline" in message:
                # The front end's own deadline (time.monotonic, one clock per host, which
                # asyncio's loop time is): the master must not lease a worker after it.
                remaining = min(timeout, float(message["deadline"]) - time.monotonic())
            ident = int(message["id"])
            task = self._spawn(self._lease(ident, timeout, remaining))
            self._acquiring[ident] = task
            task.add_done_callback(lambda _: self._acquired(ident, task))
        elif op == "cancel":
            # Its request was given up on: out of the queue now, not at its timeout. A worker
            # already leased for it comes back with a release (the front end sees no waiter).
            task = self._acquiring.pop(int(message["id"]), None)
            if task is not None:
                task.cancel()
        elif op == "release":
            worker = self.leases.pop(int(message["worker"]), None)
            if worker is not None:
                self.master.context_of[int(message["worker"])] = message.get("context")
                self.master.executor.give_back(worker, bool(message.get("recycle")))
        elif op == "kill":
            self._spawn(self._kill(int(message["worker"]), str(message.get("reason"))))
        elif op == "auth_failure":
            self.master.broadcast({"op": "auth_failure", "addr": message.get("addr")}, self)
        elif op == "ready":
            self.ready = self.started_once = True
            self._delay = _RESTART_DELAY
            self.master.check_started()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _acquired(self, ident: int, task: asyncio.Task[None]) -> None:
        # Only its own entry: a front end started again numbers its acquires from 1 anew.
        if self._acquiring.get(ident) is task:
            del self._acquiring[ident]

    async def _lease(self, ident: int, timeout: float, remaining: float) -> None:
        executor = self.master.executor
        try:
            if remaining <= 0:
                raise ScriptTimeout.after(timeout)
            worker = await executor.lease(remaining)
        except ScriptTimeout:
            error = ScriptTimeout.after(timeout)  # the caller's timeout, as one process says it
            self.send({"op": "refused", "id": ident, "error": error.to_wire()})
            return
        except TabserveError as exc:
            self.send({"op": "refused", "id": ident, "error": exc.to_wire()})
            return
        if self.sock is None:  # it went away while waiting
            executor.give_back(worker)
            return
        wid = self.master.worker_id(worker)
        self.leases[wid] = worker
        fds: tuple[int, ...] = ()
        if wid not in self.held:
            fds = (worker.channel.fileno(), worker.fd_channel.fileno())
        message = {
            "op": "leased",
            "id": ident,
            "worker": wid,
            "pid": worker.pid,
            "context": self.master.context_of.get(wid),
        }
        if self.send(message, fds):
            self.held.add(wid)
        else:
            self.leases.pop(wid, None)
            executor.give_back(worker)

    async def _kill(self, wid: int, reason: str) -> None:
        worker = self.leases.pop(wid, None)
        executor = self.master.executor
        if worker is None:
            self.send({"op": "died", "worker": wid, "reason": "stopped answering"})
            return
        if reason == "timeout":
            log.warning("a job timed out in front end %d: killing worker %d", self.index,
                        worker.pid)  # fmt: skip
            executor.retire_leased(worker, reason)
            return
        if reason == "crash":
            why = "stopped answering"
            try:
                code = await executor.exit_code(worker)
                why = describe_exit(code, executor.launcher.wrapped)
                log.error("worker %d %s while running a job", worker.pid, why)
            finally:
                # Also when this task is cancelled (its front end died meanwhile, and _lost no
                # longer holds this lease): the worker must still be retired and replaced.
                executor.retire_leased(worker, reason)
            self.send({"op": "died", "worker": wid, "reason": why})
            return
        executor.retire_leased(worker, reason)

    def _lost(self) -> None:
        """Its lease channel ended (it exited or closed it): what it leased is retired."""
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock)
            sock.close()
        for task in list(self._tasks):
            task.cancel()
        self._acquiring.clear()
        for worker in self.leases.values():
            # A job may still run in it, for nobody: it goes, with what its script started
            # (not counted as a crash: the worker did not die on its own).
            self.master.executor.retire_leased(worker, "frontend_lost")
        self.leases.clear()
        self.held.clear()
        self.ready = False

    def _reap(self, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        assert self.process is not None and self.exited is not None
        code = self.process.wait()
        self._lost()
        process_gone(self.process.pid, self.master.frontend_env[_METRICS_DIR])
        if not self.exited.done():
            self.exited.set_result(code)
        master = self.master
        if master.closing:
            return
        if not self.started_once:
            master.start_failed(self, code)
            return
        log.error("front end %d (pid %d) %s; starting another", self.index, self.process.pid,
                  describe_exit(code))  # fmt: skip
        loop.call_later(self._delay, self._restart)
        self._delay = min(self._delay * 2, 10.0)

    def _restart(self) -> None:
        if not self.master.closing:
            try:
                self.start()
            except (OSError, FrontEndFailed) as exc:
                log.error("cannot start front end %d: %s; retrying", self.index, exc)
                asyncio.get_running_loop().call_later(self._delay, self._restart)


class Master:
    """The process started as ``tabserve`` when ``TABSERVE_PROCESSES`` >= 2."""

    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        payload: bytes,
        sockets: Sequence[socket.socket],
        frontend_env: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.frontend_payload = payload
        self.frontend_env = dict(frontend_env)
        self.sockets = list(sockets)
        self.frontends = [_FrontEnd(self, i) for i in range(settings.processes)]
        self.closing = False
        self.context_of: dict[int, str | None] = {}  # worker id -> digest of the table it holds
        self._ids: dict[WorkerProcess, int] = {}
        self._next_id = 0
        self._started: asyncio.Future[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    def worker_id(self, worker: WorkerProcess) -> int:
        wid = self._ids.get(worker)
        if wid is None:
            self._next_id += 1
            wid = self._ids[worker] = self._next_id
        return wid

    def pool_state(self) -> dict[str, Any]:
        pool = self.executor
        return {
            "op": "pool",
            "alive": pool.alive,
            "size": pool.size,
            "busy": pool.busy,
            "queued": pool.queued,
            "pids": pool.pids,
            "stats": asdict(pool.stats),
            "frontends": [fe.pid for fe in self.frontends if fe.ready],
        }

    def broadcast(self, message: dict[str, Any], source: _FrontEnd | None = None) -> None:
        for frontend in self.frontends:
            if frontend is not source:
                frontend.send(message)

    async def start(self) -> None:
        self._started = asyncio.get_running_loop().create_future()
        for frontend in self.frontends:
            frontend.start()
        self._ticker = asyncio.create_task(self._tick())
        await self._started

    def check_started(self) -> None:
        if self._started is not None and not self._started.done():
            if all(frontend.ready for frontend in self.frontends):
                self._started.set_result(None)

    def start_failed(self, frontend: _FrontEnd, code: int | None) -> None:
        if self._started is not None and not self._started.done():
            self._started.set_exception(
                FrontEndFailed(f"front-end process {frontend.index} {describe_exit(code)}")
            )

    async def _tick(self) -> None:
        """Tell every front end the pool's state, and which workers are gone for good (so
        that they close their duplicates of those workers' sockets)."""
        while True:
            live = set(self.executor.members)
            for worker in [w for w in self._ids if w not in live]:
                wid = self._ids.pop(worker)
                self.context_of.pop(wid, None)
                for frontend in self.frontends:
                    if wid in frontend.held:
                        frontend.held.discard(wid)
                        frontend.send({"op": "gone", "worker": wid})
            self.broadcast(self.pool_state())
            await asyncio.sleep(_POOL_EVERY)

    def forward(self, sig: signal.Signals) -> None:
        for frontend in self.frontends:
            frontend.signal(sig)

    async def stop(self, again: Callable[[], Any]) -> None:
        """SIGTERM every front end (each drains its requests for up to the shutdown grace),
        wait for them to exit, then stop supervising. ``again`` is a further signal."""
        self.closing = True
        self.forward(signal.SIGTERM)
        waiting = [fe.exited for fe in self.frontends if fe.exited is not None]
        everyone = asyncio.ensure_future(asyncio.gather(*waiting, return_exceptions=True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace + 10.0
        while not everyone.done() and loop.time() < deadline:
            signalled = asyncio.ensure_future(again())
            await asyncio.wait(
                {everyone, signalled},
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if signalled.done():
                self.forward(signal.SIGTERM)  # a second signal cuts their drain short
            else:
                signalled.cancel()
        if not everyone.done():
            log.error("front ends still running after the shutdown grace: killing them")
        self.kill_all()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(everyone, 5.0)

    def kill_all(self) -> None:
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        self.forward(signal.SIGKILL)


_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# Tornado's listen backlog, as one process would have it.
_BACKLOG = 128


def bind_unlistened(port: int, address: str | None) -> list[socket.socket]:
    """Sockets bound as ``tornado.netutil.bind_sockets`` binds them, but not yet listening:
    the first front end to be ready calls ``listen``, so no connection is accepted by the
    kernel before a process can answer it.

    One set, inherited by every front end, and no ``SO_REUSEPORT``: with it any process of
    the same user (a script in a worker, without a sandbox) could join the port and receive a
    share of the connections, credentials included. How connections are spread over the
    front ends instead: see ``_accept_one_at_a_time``.
    """
    sockets: list[socket.socket] = []
    bound: set[Any] = set()
    flags = socket.AI_PASSIVE
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(
        address, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags
    ):
        if sockaddr in bound:
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets:  # one free port for every address, as Tornado does
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            for other in sockets:
                other.close()
            raise
        sock.setblocking(False)
        bound.add(sockaddr)
        sockets.append(sock)
    return sockets


def _accept_one_at_a_time(server: Any, sockets: Sequence[socket.socket]) -> Callable[[], None]:
    """Accept connections on the shared sockets one per wake-up, for ``server`` (Tornado's).

    Tornado accepts in a loop until the queue is empty, so on a socket every front end
    listens on, the first to wake takes every pending connection: measured, all 8 of wrk's
    keep-alive connections landed on one front end while the other idled. Taking one per
    wake-up leaves the rest to the others, which the kernel woke too. Returns what stops it.
    """
    loop = asyncio.get_running_loop()

    def accept(sock: socket.socket) -> None:
        try:
            connection, address = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another front end took it, or the client gave up
        except OSError as exc:  # EMFILE and the like: as Tornado, log and keep serving
            log.warning("cannot accept a connection: %s", exc)
            return
        server._handle_connection(connection, address)  # what Tornado's own loop calls

    for sock in sockets:
        loop.add_reader(sock, accept, sock)

    def stop() -> None:
        for sock in sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock)
            sock.close()

    return stop


async def serve_master(settings: Settings, out: TextIO) -> None:
    """``app.serve`` with several front ends: start the pool, the front ends, supervise."""
    from .app import (
        _raise_open_files_limit,
        _SignalWatch,
        banner,
        exposure_warning,
        open_configured_store,
    )
    from .sandbox import start_pool

    signals = _SignalWatch()
    _raise_open_files_limit()
    # As with one process: workers (and the zygote) start before anything secret is read.
    executor, sandbox = await start_pool(settings)
    master: Master | None = None
    sockets: list[socket.socket] = []
    metrics_dir = tempfile.mkdtemp(prefix="tabserve-metrics-")
    try:
        # Migrated or checked once here, so front ends starting together do not race at it.
        store = await asyncio.to_thread(open_configured_store, settings)
        store.close()
        for handler in logging.getLogger().handlers:
            handler.flush()
        sockets = bind_unlistened(settings.port, settings.bind_address or None)
        payload = pickle.dumps((settings, sandbox))
        # Counters add up across front ends: prometheus_client's multiprocess mode, in a
        # directory of this server's own (it must be set before they import the library).
        env = {_METRICS_DIR: metrics_dir}
        master = Master(settings, executor, payload, sockets, env)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, master.forward, signal.SIGHUP)
        started = asyncio.ensure_future(master.start())
        stopped = asyncio.ensure_future(signals.wait())
        await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            started.result()  # a front end that could not start stops the start
            port = sockets[0].getsockname()[1]
            warning = exposure_warning(settings)
            if warning:
                log.warning("%s", warning)
            text = banner(settings, port, sandbox)
            pids = ", ".join(str(fe.pid) for fe in master.frontends)
            text += f"\n  {settings.processes} front-end processes ({pids}) share the pool"
            print(text, file=out, flush=True)
            await stopped
        else:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError, FrontEndFailed):
                await started
        log.info("shutting down: stopping %d front ends", settings.processes)
        for sock in sockets:
            sock.close()  # ours: the front ends hold their own until they exit
        await master.stop(signals.wait)
    finally:
        if master is not None:
            master.kill_all()
        for sock in sockets:
            sock.close()
        await executor.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("stopped")


# -- a front end -----------------------------------------------------------------------------


class _Leased:
    """A leased worker's ``Launched``: sockets that are duplicates of the master's; the
    master alone kills, so ``kill`` here only lets go."""

    def __init__(self, pid: int, channel: socket.socket, fd_channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        self.fd_channel = fd_channel
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _wrap_pair(fds: Sequence[int]) -> tuple[socket.socket, socket.socket] | None:
    """A leased worker's two sockets, non-blocking, from the descriptors the master sent;
    None (each descriptor closed once) if they are not sockets."""
    wrapped: list[socket.socket] = []
    try:
        for fd in fds:
            wrapped.append(socket.socket(fileno=fd))
    except OSError as exc:
        log.error("the master sent a leased worker's sockets that are not sockets: %s", exc)
        for sock in wrapped:
            sock.close()
        fdpass.close_all(fds[len(wrapped) :])
        return None
    for sock in wrapped:
        sock.setblocking(False)
    channel, tables = wrapped
    return channel, tables


class MasterLink:
    """A front end's end of its lease channel."""

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None]) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.on_lost = on_lost
        self.handlers: dict[str, Callable[[dict[str, Any], list[int]], None]] = {}
        asyncio.get_running_loop().add_reader(sock, self._readable)

    def send(self, message: dict[str, Any]) -> bool:
        if self.sock is None:
            return False
        try:
            fdpass.send_message(self.sock, message)
        except OSError as exc:
            # A lost release would keep a worker leased, a lost kill a runaway running: as if
            # the master were gone, this front end stops (the master retires its leases).
            log.error("cannot reach the master process: %s", exc)
            self.close()
            self.on_lost()
            return False
        return True

    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            for message, fds in fdpass.receive_ready(self.sock):
                handler = self.handlers.get(str(message.get("op")))
                if handler is None:
                    fdpass.close_all(fds)
                    continue
                try:
                    handler(message, fds)
                except (KeyError, TypeError, ValueError) as exc:
                    fdpass.close_all(fds)
                    log.error("the master sent a malformed message %r: %s", message, exc)
        except fdpass.ChannelClosed as closed:
            if closed.error is not None:
                log.error("the master process sent something unreadable: %s", closed.error)
            self.close()
            self.on_lost()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock)
            sock.close()


class LeasedPool:
    """The executor's interface in a front end: each job runs on a worker leased from the
    master, talked to directly; what the pool looks like comes from the master."""

    def __init__(self, settings: Settings, link: MasterLink) -> None:
        self.config = PoolConfig(
            workers=settings.workers,
            request_limit=settings.max_request_bytes,
            queue_length=settings.queue_length,
        )
        self.link = link
        self.stats = PoolStats()
        self.alive = 0
        self.size = 0
        self.busy = 0
        self.queued = 0
        self.pids: list[int] = []
        self.frontends: list[int] = []
        self.known = asyncio.get_running_loop().create_future()  # the first pool state
        self._workers: dict[int, WorkerProcess] = {}
        self._waiting: dict[int, asyncio.Future[tuple[int, WorkerProcess, str | None]]] = {}
        self._deaths: dict[int, asyncio.Future[str]] = {}
        self._next = 0
        self.set_context(Context(endpoints={}))
        link.handlers.update(
            pool=self._on_pool,
            leased=self._on_leased,
            refused=self._on_refused,
            gone=self._on_gone,
            died=self._on_died,
        )

    def set_context(self, context: Context) -> None:
        self._context = orjson.dumps(context)
        self._digest = context_digest(self._context)

    async def run(
        self,
        kind: JobKind,
        payload: Payload,
        timeout: float,
        options: Mapping[str, Any] | None = None,
        fds: Sequence[int] = (),
    ) -> JobResult:
        """As ``Executor.run``, on a leased worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        enqueued = time.perf_counter()
        wid, worker, held = await self._lease(timeout, deadline)
        queue_ms = (time.perf_counter() - enqueued) * 1000
        if loop.time() >= deadline:
            # Leased just as the time ran out: no job is started only to be killed at once.
            self.link.send({"op": "release", "worker": wid, "context": held})
            raise ScriptTimeout.after(timeout)
        header = job_header(kind, options)
        digest = self._digest
        context = None if held == digest else self._context
        worker.resume()

        def timed_out() -> None:
            log.warning("job timed out after %.1f s: worker %d is killed", timeout, worker.pid)
            self._end(wid, "timeout")

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
                died=lambda: self._died(wid),
                cancelled=lambda: self._end(wid, "cancelled"),
            )
        finally:
            worker.pause()
        recycle = bool(reply.get("recycle"))
        if recycle:
            self._forget(wid)
        self.link.send({"op": "release", "worker": wid, "recycle": recycle, "context": digest})
        return job_result(reply, body, worker.pid, queue_ms, returned)

    async def _lease(
        self, timeout: float, deadline: float
    ) -> tuple[int, WorkerProcess, str | None]:
        self._next += 1
        ident = self._next
        waiter: asyncio.Future[tuple[int, WorkerProcess, str | None]]
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        try:
            acquire = {"op": "acquire", "id": ident, "timeout": timeout, "deadline": deadline}
            if not self.link.send(acquire):
                raise Overloaded("Server is shutting down")
            return await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                # Its place in the master's queue goes now, not at its timeout. If the master
                # leases a worker meanwhile, _on_leased finds no waiter and gives it back.
                self.link.send({"op": "cancel", "id": ident})
            elif waiter.exception() is None:
                wid, _, held = waiter.result()  # leased just as it was cancelled: back
                self.link.send({"op": "release", "worker": wid, "context": held})
            raise
        finally:
            self._waiting.pop(ident, None)

    def _end(self, wid: int, reason: str) -> None:
        self._forget(wid)
        self.link.send({"op": "kill", "worker": wid, "reason": reason})

    async def _died(self, wid: int) -> str:
        """Why the worker died, as the master (its parent) saw it."""
        death = asyncio.get_running_loop().create_future()
        self._deaths[wid] = death
        self._end(wid, "crash")
        try:
            return await asyncio.wait_for(death, 5.0)
        except asyncio.TimeoutError:
            return "stopped answering"
        finally:
            self._deaths.pop(wid, None)

    def _forget(self, wid: int) -> None:
        worker = self._workers.pop(wid, None)
        if worker is not None:
            worker.kill()  # closes our duplicates; the master kills the process

    # -- what the master says -----------------------------------------------------------------

    def _on_pool(self, message: dict[str, Any], fds: list[int]) -> None:
        fdpass.close_all(fds)
        self.alive = int(message["alive"])
        self.size = int(message["size"])
        self.busy = int(message["busy"])
        self.queued = int(message["queued"])
        self.pids = list(message["pids"])
        self.frontends = list(message.get("frontends", []))
        self.stats = PoolStats(**message["stats"])
        if not self.known.done():
            self.known.set_result(None)

    def _on_leased(self, message: dict[str, Any], fds: list[int]) -> None:
        # Everything read from the message before its descriptors become sockets: a malformed
        # one is rejected (MasterLink closes the raw descriptors) while no socket object owns
        # them, so each is closed once, not again when such an object is collected.
        wid = int(message["worker"])
        ident = int(message["id"])
        held = message.get("context")
        if len(fds) == 2:
            pid = int(message["pid"])
            self._forget(wid)
            pair = _wrap_pair(fds)
            if pair is not None:
                channel, tables = pair
                self._workers[wid] = WorkerProcess(
                    _Leased(pid, channel, tables),  # type: ignore[arg-type]
                    reading=False,
                )
        else:
            fdpass.close_all(fds)
        worker = self._workers.get(wid)
        waiter = self._waiting.get(ident)
        if waiter is None or waiter.done():
            # Given up on (cancelled) before the answer came: straight back, as it was.
            self.link.send({"op": "release", "worker": wid, "context": held})
            return
        if worker is None:
            # Its sockets never arrived whole: the master would lease it to us again without
            # them (it believes we hold them), so it retires the worker instead.
            self.link.send({"op": "kill", "worker": wid, "reason": "unusable lease"})
            waiter.set_exception(WorkerDied(info="The worker leased for this request is gone."))
            return
        waiter.set_result((wid, worker, held))

    def _on_refused(self, message: dict[str, Any], fds: list[int]) -> None:
        fdpass.close_all(fds)
        waiter = self._waiting.get(int(message["id"]))
        if waiter is not None and not waiter.done():
            waiter.set_exception(TabserveError.from_wire(message["error"]))

    def _on_gone(self, message: dict[str, Any], fds: list[int]) -> None:
        fdpass.close_all(fds)
        self._forget(int(message["worker"]))

    def _on_died(self, message: dict[str, Any], fds: list[int]) -> None:
        fdpass.close_all(fds)
        death = self._deaths.get(int(message["worker"]))
        if death is not None and not death.done():
            death.set_result(str(message.get("reason")))

    def lost(self) -> None:
        """The master is gone: nothing waiting for a worker will get one."""
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(Overloaded("Server is shutting down"))
        for wid in list(self._workers):
            self._forget(wid)

    async def close(self, grace: float = 2.0) -> None:
        self.lost()


def frontend_main() -> int:
    """A front-end process: what the master passed, then serve until SIGTERM."""
    marker = orjson.loads(os.environ.pop(MARKER))
    settings, sandbox = pickle.loads(sys.stdin.buffer.read())
    # A terminal's Ctrl-C reaches the whole process group: the master forwards it as SIGTERM,
    # which must be the only signal counted, or it would count as a second one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP (forwarded by the master on a reload) would end a front end still starting: it
    # is ignored until the password-file reload is installed as its handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        logs.configure(settings.log_level, settings.log_format, settings.log_file)
    except OSError as exc:
        print(f"tabserve: front end cannot open its log file: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_frontend(settings, sandbox, marker))
    except Exception as exc:
        print(f"tabserve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_frontend(settings: Settings, sandbox: Any, marker: dict[str, Any]) -> None:
    from .app import (
        _drain,
        _raise_open_files_limit,
        _SignalWatch,
        build_services,
        load_bearer,
        make_http_server,
        tls_context,
    )

    signals = _SignalWatch((signal.SIGTERM,))
    bearer = load_bearer(settings)
    _raise_open_files_limit()
    lost = asyncio.Event()
    link = MasterLink(socket.socket(fileno=int(marker["lease"])), lost.set)
    pool = LeasedPool(settings, link)
    link.on_lost = lambda: (pool.lost(), lost.set())
    await asyncio.wait_for(pool.known, 30.0)
    index = int(marker["index"])
    services = await build_services(
        settings,
        pool,
        sandbox,
        bearer,
        job_slots(settings, index),  # type: ignore[arg-type]
    )
    warm_keys: asyncio.Task[None] | None = None
    try:
        services.readiness.add(
            "process",
            lambda: (
                True,
                f"front end {index + 1} of {settings.processes}, pid {os.getpid()} "
                f"(serving: {', '.join(map(str, pool.frontends)) or 'starting'})",
            ),
        )
        throttle = services.auth.throttle
        if throttle is not None:
            # Each failure counts in every front end: P processes must not allow P times
            # the guesses.
            throttle.on_failure = lambda addr: link.send({"op": "auth_failure", "addr": addr})
            link.handlers["auth_failure"] = lambda message, fds: throttle.record_failure(
                str(message.get("addr")), shared=False
            )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, services.auth.reload)
        server = make_http_server(services, tls_context(settings))
        if services.auth.bearer is not None:
            warm_keys = asyncio.create_task(services.auth.bearer.keys.refresh())
        sockets = [socket.socket(fileno=int(fd)) for fd in marker["listen"]]
        for sock in sockets:
            sock.setblocking(False)
            sock.listen(_BACKLOG)  # the first to get here opens the port for all
        stop_accepting = _accept_one_at_a_time(server, sockets)
        syncing = asyncio.create_task(_sync_metrics(services.metrics))
        link.send({"op": "ready", "pid": os.getpid()})
        stop = asyncio.ensure_future(signals.wait())
        gone = asyncio.ensure_future(lost.wait())
        await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        stop_accepting()  # this process takes no new connection; the others still do
        server.stop()
        services.requests.draining = True
        if stop.done():
            await _drain(services.requests, settings.shutdown_grace, signals)
        else:
            stop.cancel()
            log.error("the master process went away: stopping")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), 1.0)
        syncing.cancel()
        services.metrics.sync()
    finally:
        if warm_keys is not None:
            warm_keys.cancel()
        await services.close()
        link.close()


def job_slots(settings: Settings, index: int) -> int:
    """Front end ``index``'s share of the asynchronous jobs run at once: together, what one
    process would run (workers − 1, at least 1), so jobs never take every worker from the
    requests. A front end with no share still submits jobs; another one runs them."""
    total = max(1, settings.workers - 1)
    share, extra = divmod(total, settings.processes)
    return share + (1 if index < extra else 0)


async def _sync_metrics(metrics: Any) -> None:
    """Keep this process's gauges and cache counters current for scrapes of the others."""
    while True:
        await asyncio.sleep(_POOL_EVERY)
        metrics.sync()
