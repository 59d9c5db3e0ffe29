"""Launchers: how a worker process comes to exist, behind one small interface.

The executor asks a ``Launcher`` for a worker and gets a ``Launched``: a pid, the two
sockets it talks to the worker over (frames, and tables as descriptors), a future that
resolves with the worker's exit status, and ``kill``. It does not know which launcher runs:

``FreshLauncher``
    a new interpreter per worker (``python -c <bootstrap>``), which imports numpy and
    pandas itself: about half a second per worker.
``BubblewrapLauncher``
    the same interpreter behind a ``bwrap`` command line: one sandbox (and PID namespace)
    per worker, so a kill of the sandbox takes everything the script started.
``ZygoteLauncher``
    one clean interpreter (the zygote, ``worker/zygote.py``) imports numpy, pandas and
    ``TABSERVE_WORKER_PRELOAD`` once, then forks a worker per request of ours: a few
    milliseconds per worker, and the imported pages stay shared between workers.
``InMemoryLauncher``
    for unit tests: a thread per "worker" answering frames with a given job handler.

Every worker talks over a Unix socket pair (``SOCK_STREAM``) carrying the frames of
``protocol.py``; the executor drives its end with ``loop.add_reader``, which costs fewer
objects and system calls per job than asyncio's subprocess transport (two pipes, a
protocol and a transport per pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from .. import fdpass
from ..protocol import BlockingChannel, Greeting, ProtocolError

log = logging.getLogger("tabserve.launcher")

FRESH = "fresh"
ZYGOTE = "zygote"
BUBBLEWRAP = "bubblewrap"

# The child imports tabserve from wherever this server imported it, even when the server
# runs from a source tree, without putting that path into the environment scripts can see.
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from tabserve.worker.{module} import main; sys.exit(main())"
)
# The directory holding the tabserve package (this file is tabserve/server/launcher.py).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interpreter_argv(module: str, config: Mapping[str, Any]) -> list[str]:
    """``python -c <bootstrap> <dir holding tabserve> CONFIG_JSON`` for tabserve.worker.<module>."""
    return [
        sys.executable,
        "-c",
        _BOOTSTRAP.format(module=module),
        PACKAGE_PARENT,
        orjson.dumps(dict(config)).decode(),
    ]


class Launched(Protocol):
    """A started worker, as the executor sees it."""

    pid: int
    channel: socket.socket  # frames (SOCK_STREAM), non-blocking; the executor closes it
    fd_channel: socket.socket  # tables (fdpass, SOCK_SEQPACKET), non-blocking; likewise
    exited: asyncio.Future[int | None]  # its exit status (a returncode), once it is gone

    def kill(self) -> None:
        """SIGKILL the worker and whatever its script started, as far as this launcher can."""


class Launcher(Protocol):
    """Makes workers. ``start`` before the first ``launch``, ``close`` after the last worker."""

    name: str
    wrapped: bool  # exit statuses come from a wrapper (bwrap reports a signal N as 128 + N)

    async def start(self) -> None: ...

    async def launch(self) -> Launched: ...

    async def close(self) -> None: ...


def _channel_pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """Ours and theirs, for frames (a stream) and for tables (fdpass's datagram pair)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tables_ours, tables_theirs = fdpass.socket_pair()
    for sock in (ours, tables_ours):
        sock.setblocking(False)
    return ours, theirs, tables_ours, tables_theirs


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        sock.close()


class _Child:
    """A worker that is our own child process: its exit is seen through a pidfd."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        channel: socket.socket,
        fd_channel: socket.socket,
    ) -> None:
        self._process = process
        self.pid = process.pid
        self.channel = channel
        self.fd_channel = fd_channel
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        # Readable once the process has exited: no SIGCHLD handler, no child-watcher thread.
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        code = self._process.wait()  # it has exited: this returns at once
        if not self.exited.done():
            self.exited.set_result(code)

    def kill(self) -> None:
        # The whole process group: a child that stayed in it goes too. The group outlives a
        # reaped leader while any member lives, so its id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class FreshLauncher:
    """A new interpreter per worker, optionally behind a launcher command (``prefix``)."""

    name = FRESH
    wrapped = False

    def __init__(
        self, worker_config: Mapping[str, Any], env: Mapping[str, str], prefix: Sequence[str] = ()
    ) -> None:
        self.worker_config = dict(worker_config)
        self.env = dict(env)
        self.prefix = tuple(prefix)

    async def start(self) -> None:
        pass

    async def launch(self) -> Launched:
        ours, theirs, tables_ours, tables_theirs = _channel_pairs()
        config = {
            **self.worker_config,
            "channel": theirs.fileno(),
            "fd_channel": tables_theirs.fileno(),
        }
        try:
            process = subprocess.Popen(
                [*self.prefix, *interpreter_argv("main", config)],
                stdin=subprocess.DEVNULL,
                stdout=2,  # a script's print() goes to the server's stderr (fd 2, as inherited)
                env=self.env,
                # Its own process group: a kill also takes the children that stay in it.
                start_new_session=True,
                pass_fds=(theirs.fileno(), tables_theirs.fileno()),
            )
        except BaseException:
            _close(ours, tables_ours)
            raise
        finally:
            _close(theirs, tables_theirs)
        return _Child(process, ours, tables_ours)

    async def close(self) -> None:
        pass


class BubblewrapLauncher(FreshLauncher):
    """A new interpreter per worker inside its own bubblewrap sandbox.

    Not forked from the zygote: each worker gets a PID namespace of its own (a kill takes
    everything the script started, setsid children included, and no script can see or
    signal another worker's processes), which a fork of one shared sandbox would not give.
    """

    name = BUBBLEWRAP
    wrapped = True


class _ZygoteChild:
    """A worker forked by the zygote: the zygote reaps it, reports its exit and kills it."""

    def __init__(
        self, launcher: ZygoteLauncher, pid: int, channel: socket.socket, fd_channel: socket.socket
    ) -> None:
        self._launcher = launcher
        self.pid = pid
        self.channel = channel
        self.fd_channel = fd_channel
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        # The zygote kills: it is the parent, so the pid cannot be reused before it reaps it,
        # and it also finds the script's children that left the process group (setsid).
        if not self.exited.done():
            self._launcher.request({"op": "kill", "pid": self.pid})


class ZygoteLauncher:
    """Forks workers from one preloaded, clean process.

    The zygote is started (as a fresh interpreter, with the workers' environment) before
    the server reads any secret, and takes orders only over the socket pair it inherited
    from us. ``start`` starts it; if it dies, the next ``launch`` starts another.
    """

    name = ZYGOTE
    wrapped = False

    def __init__(
        self, worker_config: Mapping[str, Any], env: Mapping[str, str], start_timeout: float = 60.0
    ) -> None:
        self.worker_config = dict(worker_config)
        self.env = dict(env)
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ready: asyncio.Future[int] | None = None
        self._forks: dict[int, tuple[asyncio.Future[_ZygoteChild], socket.socket, socket.socket]]
        self._forks = {}
        self._children: dict[int, _ZygoteChild] = {}
        self._next_id = 0
        self._starting: asyncio.Lock | None = None
        self._reap: Callable[[], None] | None = None  # the current zygote's reaper

    @property
    def pid(self) -> int | None:
        """The zygote's pid while it runs (tests and metrics look at it)."""
        return self._process.pid if self._control is not None and self._process else None

    async def start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._control is None:
                await self._start()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = fdpass.socket_pair()
        config = {**self.worker_config, "control": theirs.fileno()}
        try:
            self._process = subprocess.Popen(
                interpreter_argv("zygote", config),
                stdin=subprocess.DEVNULL,
                stdout=2,
                env=self.env,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._ready = loop.create_future()
        loop.add_reader(ours, self._on_message)
        # Reaped as soon as it exits, whenever that is: a dead zygote must not linger as a
        # zombie child of the server.
        process, pidfd = self._process, os.pidfd_open(self._process.pid)

        def reap() -> None:
            if loop.remove_reader(pidfd):
                os.close(pidfd)
            process.wait()

        loop.add_reader(pidfd, reap)
        self._reap = reap
        try:
            pid = await asyncio.wait_for(asyncio.shield(self._ready), self.start_timeout)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            self._lost()
            self._stop_process()
            raise RuntimeError(f"the worker zygote failed to start: {exc}") from None
        log.info("worker zygote %d ready", pid)

    def request(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send the zygote one order; a zygote that cannot take it is replaced."""
        if self._control is None:
            return
        try:
            fdpass.send_message(self._control, message, fds)
        except OSError as exc:
            # Its queue is full or it is gone: it is not doing its job, so it goes (its
            # workers die with it: they asked for SIGKILL when their parent dies).
            log.error("the worker zygote is not answering (%s); replacing it", exc)
            self._lost()
            self._stop_process()

    async def launch(self) -> Launched:
        await self.start()
        loop = asyncio.get_running_loop()
        ours, theirs, tables_ours, tables_theirs = _channel_pairs()
        self._next_id += 1
        ident = self._next_id
        forked: asyncio.Future[_ZygoteChild] = loop.create_future()
        self._forks[ident] = (forked, ours, tables_ours)
        try:
            self.request({"op": "fork", "id": ident}, (theirs.fileno(), tables_theirs.fileno()))
        finally:
            _close(theirs, tables_theirs)
        try:
            return await asyncio.wait_for(forked, self.start_timeout)
        except BaseException:
            pending = self._forks.pop(ident, None)
            if pending is not None:
                _close(pending[1], pending[2])
            if forked.done() and not forked.cancelled() and forked.exception() is None:
                forked.result().kill()  # forked just as we gave up: leave no orphan behind
            raise

    def _on_message(self) -> None:
        if self._control is None:
            return
        try:
            for message, fds in fdpass.receive_ready(self._control):
                fdpass.close_all(fds)  # the zygote never sends descriptors
                self._handle(message)
        except fdpass.ChannelClosed as closed:
            if closed.error is not None:
                log.error("the worker zygote sent something unreadable: %s", closed.error)
            code = self._process.poll() if self._process else None
            log.error("the worker zygote went away (exit status %s)", code)
            self._lost()

    def _handle(self, message: dict[str, Any]) -> None:
        if "exited" in message:
            child = self._children.pop(message["exited"], None)
            if child is not None and not child.exited.done():
                child.exited.set_result(message.get("status"))
        elif "forked" in message:
            pending = self._forks.pop(message["forked"], None)
            if pending is None:  # we gave up on it: it must not live on
                self.request({"op": "kill", "pid": message["pid"]})
                return
            forked, channel, tables = pending
            child = _ZygoteChild(self, message["pid"], channel, tables)
            self._children[child.pid] = child
            if forked.done():
                child.kill()
            else:
                forked.set_result(child)
        elif "failed" in message:
            pending = self._forks.pop(message["failed"], None)
            if pending is not None:
                _close(pending[1], pending[2])
                if not pending[0].done():
                    pending[0].set_exception(RuntimeError(f"fork failed: {message.get('error')}"))
        elif self._ready is not None and not self._ready.done():
            if message.get("ready"):
                self._ready.set_result(int(message["pid"]))
            else:
                self._ready.set_exception(RuntimeError(str(message.get("error", message))))

    def _lost(self) -> None:
        """The zygote is gone (or being replaced): fail what waits on it."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(control)
            control.close()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("it exited"))
        for forked, channel, tables in self._forks.values():
            _close(channel, tables)
            if not forked.done():
                forked.set_exception(RuntimeError("the worker zygote went away"))
        self._forks.clear()
        # Its workers die with it (parent-death signal); their exit status is not known.
        for child in self._children.values():
            if not child.exited.done():
                child.exited.set_result(None)
        self._children.clear()

    def _stop_process(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)

    async def close(self, grace: float = 2.0) -> None:
        """Close the control socket: the zygote kills what is left of its workers and exits."""
        self._lost()
        process = self._process
        if process is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while process.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._stop_process()
        if self._reap is not None:
            self._reap()  # waits for it, and releases its pidfd


Handler = Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]


class _Thread:
    """A fake worker: a thread answering frames with a job handler, for unit tests."""

    _pids = 0

    def __init__(self, handler: Handler, channel: socket.socket, fd_channel: socket.socket):
        loop = asyncio.get_running_loop()
        _Thread._pids += 1
        self.pid = -_Thread._pids  # never a real process: nothing may signal it
        self.channel = channel
        self.fd_channel = fd_channel
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._theirs: socket.socket | None = None
        self._handler = handler
        self._loop = loop

    def run(self, theirs: socket.socket) -> None:
        theirs.setblocking(True)
        self._theirs = theirs
        wire = BlockingChannel(theirs.fileno(), theirs.fileno())
        code = 0
        try:
            wire.send(Greeting(ready=True, pid=self.pid))
            while True:
                header, payload = wire.receive()
                reply, body = self._handler(header, bytes(payload))
                if header.get("kind") != "context":  # a context frame has no answer
                    wire.send(reply, body)
        except (ProtocolError, OSError):
            code = 0  # our end closed: as a worker's exit at end of input
        except BaseException:
            code = 1
        finally:
            theirs.close()
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._finish, code)

    def _finish(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)

    def kill(self) -> None:
        # A thread cannot be killed: cutting its socket ends it at its next frame.
        if self._theirs is not None:
            with contextlib.suppress(OSError):
                self._theirs.shutdown(socket.SHUT_RDWR)


class InMemoryLauncher:
    """Workers that are threads of this process running ``handler(header, payload)``.

    For unit tests of the executor's bookkeeping (queueing, context, replacement): the
    frames cross a real socket pair, but no process is started and nothing is confined.
    """

    name = "in-memory"
    wrapped = False

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.launched = 0

    async def start(self) -> None:
        pass

    async def launch(self) -> Launched:
        ours, theirs, tables_ours, tables_theirs = _channel_pairs()
        tables_theirs.close()
        fake = _Thread(self.handler, ours, tables_ours)
        threading.Thread(target=fake.run, args=(theirs,), daemon=True).start()
        self.launched += 1
        return fake

    async def close(self) -> None:
        pass
