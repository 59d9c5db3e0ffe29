"""The front end's side of Arrow Flight: the Flight process, and ``/evaluate`` with ``dataPath``.

The Flight server runs in a process of its own (``tabserve.flight``) because pyarrow loads
numpy when it is imported, and the front end must not. This module imports neither: it
talks to that process over a Unix socket pair (JSON messages, descriptors attached; see
fdpass.py) and moves tables as file descriptors, never as bytes.

* The Flight process asks this side to authenticate every call; the answer comes from the
  same ``Authenticator`` that guards HTTP, so Flight has exactly HTTP's users, permissions,
  failure throttling and (when it has them) bearer tokens.
* ``POST /evaluate {"script", "dataPath"}``: take the caller's table out of the store (a
  sealed memfd), run the script in a worker with that descriptor (the worker maps it and
  builds the DataFrame), and store the worker's result table (another sealed memfd) under a
  new path owned by the caller, which is the answer: ``{"outputDataPath": ...}``.
* If the Flight process dies it is started again (its tables are lost); after a ``shutdown``
  action it stays down, as TabPy's does, until tabserve restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .. import fdpass
from ..config import Settings
from ..errors import BadRequest, FlightUnavailable, ScriptError, TabserveError
from ..protocol import JobKind
from .auth import Authenticator
from .credentials import User
from .executor import Executor, JobResult
from .health import Verdict
from .launcher import PACKAGE_PARENT

log = logging.getLogger("tabserve.flight")

# The Flight process: numpy and pandas cannot be imported there (it never converts a table),
# and a pyarrow without Flight support is reported in one line, with exit code 3.
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "sys.modules['numpy'] = None; sys.modules['pandas'] = None\n"
    "try:\n    import pyarrow.flight\n"
    "except ImportError as exc:\n"
    "    print('tabserve: the Arrow Flight server needs pyarrow with Flight support (pip "
    'install "tabserve[arrow]"):\', exc, file=sys.stderr); sys.exit(3)\n'
    "from tabserve.flight.main import main; sys.exit(main())"
)
_MISSING_PYARROW = 3
_START_TIMEOUT = 60.0
_CONTROL_TIMEOUT = 60.0
# A body that can name a Flight table is small (a script and a path); larger bodies are
# ordinary /evaluate calls and are never parsed here.
MAX_FLIGHT_BODY = 1024 * 1024
_NOT_FOUND_INFO = "KeyError : 'Flight not found.'"


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FlightStartError(RuntimeError):
    """The Flight server could not start; the message is one line for the operator."""


def listen_host(bind_address: str) -> str:
    """The gRPC listen host for TABSERVE_BIND_ADDRESS ("" and "::" mean every interface)."""
    if bind_address in ("", "::"):
        return "[::]"
    if ":" in bind_address:
        return f"[{bind_address}]"
    return bind_address


def advertise_host(bind_address: str) -> str:
    """The host put into FlightInfo locations: the bind address, or this machine's name
    when listening everywhere (TabPy advertises 0.0.0.0, which no client can reach)."""
    if bind_address in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    if ":" in bind_address:
        return f"[{bind_address}]"
    return bind_address


def data_path(body: bytes, encoding: str) -> str | None:
    """The ``dataPath`` of an /evaluate body, or None when it names no Flight table.

    Only small bodies that mention ``dataPath`` at all are parsed, so ordinary /evaluate
    calls (up to hundreds of MB of JSON) cost one substring search here.
    """
    if len(body) > MAX_FLIGHT_BODY:
        return None
    if encoding == "gzip":
        try:
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(body, MAX_FLIGHT_BODY + 1)
        except zlib.error:
            return None  # the worker reports the bad body as usual
        if len(body) > MAX_FLIGHT_BODY:
            return None
    elif encoding not in ("", "identity"):
        return None
    if b"dataPath" not in body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict) or "dataPath" not in document:
        return None
    if "script" not in document:
        raise BadRequest("Script is empty.")  # before the table is taken, as in TabPy
    path = document["dataPath"]
    if not isinstance(path, str):
        raise BadRequest("'dataPath' must be a string: a path returned by getUniquePath")
    return path


@dataclass
class _Process:
    process: asyncio.subprocess.Process
    sock: socket.socket
    port: int = 0
    location: str = ""


class FlightService:
    """Starts and supervises the Flight process and answers its questions."""

    def __init__(self, settings: Settings, auth: Authenticator, executor: Executor) -> None:
        self.settings = settings
        self.auth = auth
        self.executor = executor
        self.port = 0
        self.location = ""
        self.stopped_by: str | None = None  # set when a 'shutdown' action stopped it
        self._current: _Process | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    # -- life cycle

    async def start(self) -> None:
        """Start the Flight process and wait until it listens; FlightStartError otherwise."""
        self._current = await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    def _config(self, control_fd: int) -> dict[str, Any]:
        settings = self.settings
        config: dict[str, Any] = {
            "control_fd": control_fd,
            "listen_host": listen_host(settings.bind_address),
            "port": self.port or settings.arrow_flight_port,  # a restart keeps the port
            "advertise_host": advertise_host(settings.bind_address),
            "advertise": settings.flight_location,
            "ttl": settings.flight_ttl,
            "max_bytes": settings.flight_max_mb * 1024 * 1024,
            "log_level": settings.log_level,
            "log_format": settings.log_format,
            "log_file": str(settings.log_file) if settings.log_file else None,
        }
        if settings.tls_enabled:
            config["tls"] = {"cert": str(settings.certificate_file), "key": str(settings.key_file)}
        return config

    async def _spawn(self) -> _Process:
        ours, theirs = fdpass.socket_pair()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _BOOTSTRAP,
                PACKAGE_PARENT,
                orjson.dumps(self._config(theirs.fileno())).decode(),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # signals to the server's group are the front end's
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        current = _Process(process, ours)
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable, current)
        exited = asyncio.ensure_future(process.wait())
        try:
            done, _ = await asyncio.wait(
                {self._ready, exited}, timeout=_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if exited not in done:
                exited.cancel()  # the supervisor waits for the exit from now on
            if self._ready in done:
                ready = self._ready.result()
                if ready.get("op") == "ready":
                    current.port = int(ready["port"])
                    current.location = str(ready["location"])
                    self.port, self.location = current.port, current.location
                    return current
                reason = str(ready.get("message") or "it failed")
            elif exited in done:
                code = exited.result()
                if code == _MISSING_PYARROW:
                    reason = "pyarrow with Flight support is missing: pip install 'tabserve[arrow]'"
                else:
                    reason = f"it exited with code {code} (see the log)"
            else:
                reason = f"it did not start within {_START_TIMEOUT:g} s"
        except BaseException:
            exited.cancel()
            self._discard(current)
            raise
        self._discard(current)
        port = self.settings.arrow_flight_port
        raise FlightStartError(f"the Arrow Flight server (port {port}) could not start: {reason}")

    def _discard(self, current: _Process) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(current.sock.fileno())
        current.sock.close()
        if current.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                current.process.kill()

    async def _supervise(self) -> None:
        """Restart the Flight process when it dies, unless it was told to stop."""
        delay = 0.5
        while not self._closing:
            current = self._current
            assert current is not None
            code = await current.process.wait()
            self._discard(current)
            self._fail_pending(FlightUnavailable(info="The Arrow Flight server stopped."))
            if self._closing:
                return
            if self.stopped_by is not None:
                log.warning(
                    "Arrow Flight server stopped by a shutdown action of user %r; it stays down "
                    "until tabserve restarts",
                    self.stopped_by,
                )
                self._current = None
                return
            log.error("Arrow Flight server exited (code %s); restarting it", code)
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    self._current = await self._spawn()
                    delay = 0.5
                    break
                except (FlightStartError, OSError) as exc:
                    log.error("%s; retrying", exc)
                    delay = min(delay * 2, 10.0)

    async def close(self, grace: float = 5.0) -> None:
        self._closing = True
        current = self._current
        if current is not None:
            with contextlib.suppress(OSError):
                fdpass.send_message(current.sock, {"op": "stop"})
            try:
                await asyncio.wait_for(current.process.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("Arrow Flight server did not stop in %g s: killing it", grace)
            self._discard(current)
            with contextlib.suppress(ProcessLookupError):
                await current.process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        self._fail_pending(FlightUnavailable(info="tabserve is shutting down."))

    def readiness(self) -> Verdict:
        if self._current is not None and self._current.process.returncode is None:
            return True, f"listening on port {self.port}"
        if self.stopped_by is not None:
            return True, f"stopped by a shutdown action of {self.stopped_by!r}"
        return False, "the Arrow Flight server is restarting"

    # -- the control channel

    def _readable(self, current: _Process) -> None:
        while True:
            try:
                received = fdpass.receive_message(current.sock)
            except BlockingIOError:
                return
            except (OSError, fdpass.FdProtocolError) as exc:
                log.error("Arrow Flight control channel: %s", exc)
                received = None
            if received is None:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(current.sock.fileno())
                return
            message, fds = received
            self._dispatch(current, message, fds)

    def _dispatch(self, current: _Process, message: dict[str, Any], fds: list[int]) -> None:
        if "re" in message:
            future = self._pending.pop(message["re"], None)
            if future is not None and not future.done():
                future.set_result((message, fds))
            else:
                fdpass.close_all(fds)
            return
        fdpass.close_all(fds)  # the Flight process never sends us descriptors unasked
        op = message.get("op")
        if op in ("ready", "failed"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif op == "auth":
            self._spawn_task(self._answer_auth(current, message))
        elif op == "stopped":
            self.stopped_by = str(message.get("by", ""))
        else:
            log.error("Arrow Flight server sent an unknown message %r", op)

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_auth(self, current: _Process, message: dict[str, Any]) -> None:
        """Who a Flight call's credentials belong to, by HTTP's rules (401/403/406)."""
        answer: dict[str, Any]
        try:
            # One client name for every Flight caller: gRPC does not tell the middleware
            # the peer's address, so repeated failures slow down Flight logins as a whole.
            user = await self.auth.authenticate(message.get("header"), "Arrow Flight client")
            self.auth.authorize_route(user, None, None)  # no Flight call takes endpoint keys
            self.auth.authorize(user, message.get("permission"))
            # The owner, not the name: a token's user may have no name, and must still have
            # tables of its own (auth._token_identity).
            answer = {"user": user.owner, "permissions": sorted(user.permissions)}
        except TabserveError as exc:
            # A 403's info says which permission was missing; its message speaks of HTTP.
            detail = exc.info if exc.status == 403 and isinstance(exc.info, str) else ""
            answer = {"status": exc.status, "message": detail or exc.message}
        except Exception as exc:  # never leave a gRPC thread waiting for an answer
            log.error("authenticating an Arrow Flight call failed", exc_info=exc)
            answer = {"status": 401, "message": "Authentication failed"}
        await self._send(current, {**answer, "re": message.get("id")})

    async def _send(
        self, current: _Process, message: dict[str, Any], fds: Sequence[int] = ()
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                fdpass.send_message(current.sock, message, fds)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                fd = current.sock.fileno()
                loop.add_writer(fd, _settle, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)

    async def _request(
        self, message: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        current = self._current
        if current is None or current.process.returncode is not None:
            raise FlightUnavailable(info=self._down_reason())
        ident = next(self._ids)
        future: asyncio.Future[tuple[dict[str, Any], list[int]]]
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            await self._send(current, {**message, "id": ident}, fds)
            # Shielded: an answer arriving after we gave up finds no pending entry, and
            # _dispatch closes its descriptors.
            return await asyncio.wait_for(asyncio.shield(future), _CONTROL_TIMEOUT)
        except asyncio.TimeoutError:
            raise FlightUnavailable(info="The Arrow Flight server did not answer.") from None
        except OSError:
            raise FlightUnavailable(info=self._down_reason()) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                fdpass.close_all(future.result()[1])  # delivered just as we were cancelled
            raise
        finally:
            self._pending.pop(ident, None)

    def _down_reason(self) -> str:
        if self.stopped_by is not None:
            return f"The Arrow Flight server was shut down by {self.stopped_by!r}."
        return "The Arrow Flight server is not running."

    def _fail_pending(self, error: TabserveError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    # -- /evaluate with dataPath

    async def take(self, owner: str, path: str) -> int:
        """Remove the caller's table at ``path`` from the store: a sealed memfd we now own."""
        answer, fds = await self._request({"op": "take", "owner": owner, "path": path})
        if answer.get("error") == "not_found" or len(fds) != 1:
            fdpass.close_all(fds)
            # TabPy's answer for a path that holds no table.
            raise ScriptError(info=_NOT_FOUND_INFO)
        return fds[0]

    async def store(self, owner: str, fd: int) -> str:
        """Store a worker's result table under a new path owned by ``owner``."""
        answer, fds = await self._request({"op": "store", "owner": owner}, [fd])
        fdpass.close_all(fds)
        if "path" not in answer:
            detail = str(answer.get("message") or answer.get("error"))
            raise ScriptError(info=f"The result table could not be stored: {detail}")
        return str(answer["path"])

    async def evaluate(
        self, user: User, path: str, body: bytes, encoding: str, timeout: float
    ) -> JobResult:
        """Run an /evaluate body over the caller's Flight table; the answer names the result.

        The worker gets the table as a descriptor and hands the result back the same way;
        it runs under the usual deadline and is killed like any other when it passes it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        table = await self.take(user.owner, path)
        options: dict[str, Any] = {"encoding": encoding}
        refusal = self.auth.script_query_refusal(user)
        if refusal is not None:
            options["query_refusal"] = refusal  # the worker raises it from tabpy.query()
        try:
            result = await self.executor.run(
                JobKind.EVALUATE_ARROW,
                body,
                max(deadline - loop.time(), 0.001),
                options,
                fds=[table],
            )
        finally:
            os.close(table)
        try:
            if not result.fds:
                return result  # the script returned None: TabPy answers null
            if len(result.fds) != 1 or not fdpass.is_sealed(result.fds[0]):
                raise TabserveError(
                    "Internal server error", "The worker handed back a malformed result table."
                )
            output = await self.store(user.owner, result.fds[0])
        finally:
            fdpass.close_all(result.fds)
        answer = json.dumps({"outputDataPath": output}).encode()
        return JobResult(answer, result.meta)
