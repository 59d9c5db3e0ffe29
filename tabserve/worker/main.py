"""The worker process: receives jobs over a pipe, runs user code, answers with JSON bytes.

Started by a ``server.launcher`` launcher: as a fresh interpreter, or forked from the zygote
(``worker/zygote.py``), never from the server, so it holds none of the server's memory or
secrets. It runs in its own session and process group, so that a timeout can kill it together
with anything it spawned in that group; the zygote, and bubblewrap's PID namespace, also reach
a child that started a session of its own. It knows nothing of HTTP.
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import importlib
import json
import logging
import math
import os
import resource
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy
import orjson
import pandas

from .. import fdpass, logs
from ..errors import BadRequest, EndpointNotFound, ScriptError, TabserveError
from ..protocol import (
    BlockingChannel,
    Context,
    EndpointEntry,
    Greeting,
    JobHeader,
    JobKind,
    ProtocolError,
    ReplyHeader,
    Telemetry,
)
from ..store.archives import python_mismatch
from . import self_check
from .bodies import (
    EvaluateRequest,
    check_result_length,
    count_rows,
    decode_body,
    encode_result,
    parse_json,
)
from .script import (
    ScriptSyntaxError,
    compile_script,
    describe_exception,
    load_function,
)
from .unpickling import load_archive, load_callable, target_function

log = logging.getLogger("tabserve.worker")

WORKER_NICENESS = 5

# Names that TabPy scripts in the wild use without importing them.
_CONVENIENCE = {
    "pandas": pandas,
    "pd": pandas,
    "numpy": numpy,
    "np": numpy,
    "json": json,
    "math": math,
    "datetime": datetime,
    "time": time,
    "uuid": uuid,
    "logging": logging,
}


def fresh_namespace() -> dict[str, Any]:
    """Globals for one call: nothing a script defines survives into the next request."""
    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": "__tabserve_script__"}
    namespace.update(_CONVENIENCE)
    return namespace


class EndpointError(Exception):
    """The exception scripts see when ``tabpy.query`` fails: it names the endpoint and the
    cause. Its name shows in the script's error message (docs/endpoints.md quotes it)."""


class EndpointUnavailable(Exception):
    """Internal: a deployed endpoint could not answer (not deployed, did not load, raised).

    Raised by ``Worker.call_endpoint``; rendered as an HTTP error for /query (``for_query``)
    and as an ``EndpointError`` for ``tabpy.query`` in a script (``for_script``).
    """

    def __init__(self, kind: str, name: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "missing", "load" or "call"
        self.name = name
        self.detail = detail

    def for_script(self) -> EndpointError:
        if self.kind == "missing":
            return EndpointError(f"endpoint '{self.name}' is not deployed")
        if self.kind == "load":
            return EndpointError(f"endpoint '{self.name}' could not be loaded: {self.detail}")
        return EndpointError(f"endpoint '{self.name}' raised {self.detail}")

    def for_query(self) -> TabserveError:
        if self.kind == "missing":
            return EndpointNotFound(self.name)
        failure = "LoadFailed" if self.kind == "load" else "QueryFailed"
        error = f"{self.detail}" if self.kind == "call" else f"Load failed: {self.detail}"
        return ScriptError(
            f"Error querying function '{self.name}'",
            {"uri": f"/query/{self.name}", "error": error, "type": failure},
        )


class ScriptTabpy:
    """The ``tabpy`` object scripts receive (``tabpy.query(name, *args, **kwargs)``)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def query(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._worker.query_from_script(name, args, kwargs)


class Worker:
    """Runs jobs one at a time. ``handle`` never raises for a failure of user code."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.memory_mb: int = config.get("memory_mb", 0)
        self.cpu_seconds: int = config.get("cpu_seconds", 0)
        self.request_limit: int = config["request_limit"]
        self.gzip_enabled: bool = config.get("gzip_enabled", True)
        self.tabpy = ScriptTabpy(self)
        self.endpoints: dict[str, EndpointEntry] = {}
        self._loaded: dict[str, Callable[..., Any]] = {}  # archive path -> callable
        # Its descriptor is opened by confine() when the worker gives up root (see _load).
        self.archive_dir: str = config.get("archive_dir", "")
        self.archive_dir_fd: int | None = None
        # Sealed tables a job hands back (an Arrow result); the main loop sends and closes them.
        self.outgoing_fds: list[int] = []
        # What a job parsed and computed, kept alive until its reply is sent: freeing a
        # million-row request takes tens of milliseconds, which the caller need not wait for.
        self.spent: object = None
        # Set for one script whose caller may not query (a token without the scope).
        self.query_refusal: str | None = None

    def set_context(self, context: Context) -> None:
        """The endpoint table (a ``context`` frame) for the jobs that follow."""
        self.endpoints = context.get("endpoints", {})
        live = {entry.get("path") for entry in self.endpoints.values()}
        for path in [p for p in self._loaded if p not in live]:
            del self._loaded[path]  # removed or superseded: free its memory

    def handle(
        self, header: JobHeader, payload: bytes, fds: Sequence[int] = ()
    ) -> tuple[ReplyHeader, bytes]:
        """Run one job; the reply says how it went, never an exception. ``fds`` are the
        tables that came with it (the caller closes them)."""
        started = time.perf_counter()
        logs.call_id.set(header.get("call_id") or "")
        # An asynchronous job has a longer deadline than a request, and a CPU allowance to match
        # (still within the worker's lifetime budget).
        _arm_cpu_backstop(header.get("cpu_seconds") or self.cpu_seconds if self.cpu_seconds else 0)
        telemetry: Telemetry = {}
        try:
            body, telemetry = self._dispatch(header, payload, fds)
            reply: ReplyHeader = {"status": 200}
        except TabserveError as exc:
            reply, body = _error_reply(exc), b""
        except MemoryError:
            limit = f"its memory limit of {self.memory_mb} MiB" if self.memory_mb else "memory"
            error = ScriptError(info=f"MemoryError : the script exceeded {limit}")
            # The heap may be fragmented or half-built: start the next request afresh.
            reply, body = {**_error_reply(error), "recycle": True}, b""
        except Exception as exc:
            # A fault of tabserve's own, not of the script (those are ScriptErrors by now):
            # answer it, and keep the worker rather than let one request kill it.
            log.error("job failed inside the worker", exc_info=exc)
            error = ScriptError(info=f"{type(exc).__name__} : {exc}")
            reply, body = _error_reply(error), b""
        telemetry["exec_ms"] = round((time.perf_counter() - started) * 1000, 3)
        reply["telemetry"] = telemetry
        if _cpu_budget_spent(self.cpu_seconds):
            reply["recycle"] = True  # the next job could not get its full CPU allowance
        if reply["status"] != 200:
            fdpass.close_all(self.outgoing_fds)  # a failed job hands nothing back
            self.outgoing_fds = []
        return reply, body

    def _dispatch(
        self, header: JobHeader, payload: bytes, fds: Sequence[int]
    ) -> tuple[bytes, Telemetry]:
        kind = header.get("kind")
        if kind == JobKind.EVALUATE:
            return self.evaluate(header, payload)
        if kind == JobKind.EVALUATE_ARROW:
            from . import arrow  # pyarrow is optional: loaded by the first Flight job

            return arrow.evaluate(self, header, payload, fds)
        if kind == JobKind.QUERY:
            return self.query(header, payload)
        if kind == JobKind.LOAD:
            return self.load(header)
        if kind == JobKind.PING:
            return b"{}", {}
        if kind == JobKind.SELF_CHECK:
            try:
                return orjson.dumps(self_check.run(header.get("params", {}))), {}
            except Exception as exc:
                raise ScriptError(
                    "the sandbox self-check crashed", describe_exception(exc)
                ) from None
        raise BadRequest(f"unknown job kind {kind!r}")

    def evaluate(self, header: JobHeader, payload: bytes) -> tuple[bytes, Telemetry]:
        body = decode_body(payload, header.get("encoding"), self.request_limit, self.gzip_enabled)
        request = EvaluateRequest.parse(parse_json(body))
        release(payload, body)
        result, script_hash = self.run_script(
            request.script, request.data, header.get("query_refusal")
        )
        self.spent = (request, result)  # freed after the reply is sent (serve)
        check_result_length(request.data, result)
        meta: Telemetry = {"rows_in": _rows_in(request.data.values()), "script_hash": script_hash}
        rows_out = count_rows(result)
        if rows_out is not None:
            meta["rows_out"] = rows_out
        return encode_result(result), meta

    def run_script(
        self, script: str, data: dict[str, Any], query_refusal: str | None = None
    ) -> tuple[Any, str]:
        """Run ``script`` with ``data`` (``_arg1`` … ``_argN``) as arguments: (result, hash).

        A failure of the script (or its syntax) raises ScriptError in TabPy's shape.
        ``query_refusal``, when given, is what ``tabpy.query()`` raises in this script (its
        caller's token lacks the query scope).
        """
        # The text itself only at DEBUG: scripts can embed data or credentials.
        script_hash = hashlib.sha256(script.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        log.debug("script %s:\n%s", script_hash, script)
        try:
            code = compile_script(script, tuple(f"_arg{i}" for i in range(1, len(data) + 1)))
        except ScriptSyntaxError as exc:
            raise ScriptError(info=str(exc)) from None
        function = load_function(code, fresh_namespace())
        self.query_refusal = query_refusal
        try:
            result = function(self.tabpy, **data)
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:
            log.error("script %s failed", script_hash, exc_info=exc)
            raise ScriptError(info=describe_exception(exc)) from None
        finally:
            self.query_refusal = None
        return result, script_hash

    def query(self, header: JobHeader, payload: bytes) -> tuple[bytes, Telemetry]:
        """``/query/<name>``: ``data`` as an object is keyword arguments, as an array positional."""
        body = decode_body(payload, header.get("encoding"), self.request_limit, self.gzip_enabled)
        document = parse_json(body)
        release(payload, body)
        self.spent = document  # freed after the reply is sent (serve)
        if not isinstance(document, dict) or "data" not in document:
            raise BadRequest('Input data must be a JSON object with a key called "data"')
        data = document["data"]
        if isinstance(data, dict):
            args, kwargs = (), data
        elif isinstance(data, list):
            args, kwargs = tuple(data), {}
        else:
            raise BadRequest(
                "Query parameter needs to be a dictionary or a list. "
                f"Given value is of type {type(data).__name__}"
            )
        try:
            envelope = self.call_endpoint(header["name"], args, kwargs)
        except EndpointUnavailable as failure:
            raise failure.for_query() from None
        meta: Telemetry = {
            "model": envelope["model"],
            "version": envelope["version"],
            "rows_in": _rows_in(kwargs.values() if kwargs else args),
        }
        rows_out = count_rows(envelope["response"])
        if rows_out is not None:
            meta["rows_out"] = rows_out
        return encode_result(envelope), meta

    def query_from_script(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """``tabpy.query`` inside a script: the deployed function, called in this process.

        TabPy sends the name through a ``/query/<name>`` URL, which the server path-decodes,
        so workbooks written for it say ``tabpy.query('Sentiment%20Analysis', ...)``. The
        name is decoded once here, as tabserve's own ``/query/<name>`` route decodes it
        (docs/api.md: TabPy decodes that path twice; tabserve once, everywhere).
        """
        if self.query_refusal is not None:
            raise EndpointError(self.query_refusal)
        if isinstance(name, str):
            # plus=False semantics, as in a URL path: '+' stays '+'; bad UTF-8 cannot match a
            # deployable (ASCII) name, so replacing it only shapes the "not deployed" message.
            name = unquote(name, errors="replace")
        try:
            return self.call_endpoint(name, args, kwargs)
        except EndpointUnavailable as failure:
            raise failure.for_script() from None

    def load(self, header: JobHeader) -> tuple[bytes, Telemetry]:
        """Check that an archive loads here (a deploy is only accepted if it does)."""
        try:
            self._callable(header["name"], header["entry"])
        except EndpointUnavailable as failure:
            raise BadRequest(f"could not load endpoint '{failure.name}'", failure.detail) from None
        return b"{}", {}

    def call_endpoint(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        entry = self.endpoints.get(name)  # aliases come resolved to their model's entry
        if entry is None:
            raise EndpointUnavailable("missing", name, "not deployed")
        model = entry["model"]
        function = self._callable(model, entry)
        try:
            result = function(*args, **kwargs)
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:
            log.error("endpoint %s failed", model, exc_info=exc)
            raise EndpointUnavailable("call", model, _describe_model_error(exc, function)) from None
        return {
            "response": result,
            "version": entry["version"],
            "model": model,
            "uuid": str(uuid.uuid4()),
        }

    def _callable(self, name: str, entry: EndpointEntry) -> Callable[..., Any]:
        path = entry["path"]
        function = self._loaded.get(path)
        if function is None:
            mismatch = python_mismatch(entry.get("python_version"))
            if mismatch:
                raise EndpointUnavailable("load", name, mismatch)
            try:
                function = self._load(path)
            except MemoryError:
                raise
            except Exception as exc:
                log.error("loading endpoint %s failed", name, exc_info=exc)
                raise EndpointUnavailable("load", name, f"{type(exc).__name__}: {exc}") from None
            self._loaded[path] = function
        return function

    def _load(self, path: str) -> Callable[..., Any]:
        """Unpickle an archive; in the archive directory, through the descriptor kept for it.

        A worker that gave up root may be unable to walk the directories above the state
        directory (``/root`` is 0700); the descriptor opened before the switch still works.
        """
        if self.archive_dir_fd is not None and self.archive_dir:
            relative = os.path.relpath(path, self.archive_dir)
            if not relative.startswith(os.pardir):
                fd = os.open(relative, os.O_RDONLY, dir_fd=self.archive_dir_fd)
                with os.fdopen(fd, "rb") as handle:
                    return load_callable(handle)
        return load_archive(Path(path))


def release(*buffers: bytes | bytearray) -> None:
    """Give back the memory of a request's bytes once they are parsed: the job's frame is a
    bytearray only this loop holds, and its 40 MB need not live while the script runs."""
    for buffer in buffers:
        if isinstance(buffer, bytearray):
            buffer.clear()


def _error_reply(error: TabserveError) -> ReplyHeader:
    return error.to_wire()  # type: ignore[return-value]  # {status, message, info}


def _rows_in(columns: Any) -> int:
    """The longest list among the arguments: one value per row of Tableau's data."""
    return max((len(column) for column in columns if isinstance(column, list)), default=0)


def _describe_model_error(exc: BaseException, function: Callable[..., Any]) -> str:
    """``ValueError: message (line N)``, N being the line in the deployed function's source."""
    text = f"{type(exc).__name__}: {exc}"
    code = getattr(target_function(function), "__code__", None)
    line = None
    if code is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == code.co_filename:
                line = frame.lineno
    return f"{text} (line {line})" if line else text


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# RLIMIT_CPU counts a process's whole life, and a worker lives for many jobs: the hard limit
# is a lifetime budget of this many jobs' worth, the soft limit is moved before each job.
_CPU_LIFETIME_JOBS = 20


def _set_limit(limit: int, value: int) -> None:
    if value > 0:
        resource.setrlimit(limit, (value, value))


def _arm_cpu_backstop(cpu_seconds: int) -> None:
    """Let the coming job use at most ``cpu_seconds`` of CPU, then SIGXCPU kills the worker.

    The executor's deadline kills first in normal operation; this holds even if the server
    cannot (it hangs, or the script outruns it with threads).
    """
    if cpu_seconds <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(_cpu_used()) + cpu_seconds + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _cpu_budget_spent(cpu_seconds: int) -> bool:
    if cpu_seconds <= 0:
        return False
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    return hard != resource.RLIM_INFINITY and _cpu_used() + cpu_seconds + 1 > hard


def confine(worker: Worker, config: dict[str, Any]) -> None:
    """Apply the resource limits and give up root, before the worker says it is ready.

    Runs after tabserve, numpy and pandas are imported (as the launching user) and before any
    user code, so no request ever runs with the server's identity when a switch is asked for.
    """
    limits: dict[str, int] = config.get("limits", {})
    if worker.memory_mb > 0:
        _set_limit(resource.RLIMIT_AS, worker.memory_mb * 1024 * 1024)
    _set_limit(resource.RLIMIT_FSIZE, limits.get("fsize", 0) * 1024 * 1024)
    _set_limit(resource.RLIMIT_NOFILE, limits.get("nofile", 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not dump a heap to disk
    if worker.cpu_seconds > 0:
        lifetime = int(_cpu_used()) + worker.cpu_seconds * _CPU_LIFETIME_JOBS
        resource.setrlimit(resource.RLIMIT_CPU, (lifetime, lifetime))
    drop_to = config.get("drop_to")
    if drop_to:
        uid, gid = drop_to
        if worker.archive_dir and os.path.isdir(worker.archive_dir):
            worker.archive_dir_fd = os.open(worker.archive_dir, os.O_RDONLY | os.O_DIRECTORY)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # also clears every capability: there is no way back
        if config.get("die_with"):
            # setuid cleared the parent-death signal a zygote's worker asked for.
            from .zygote import die_with_parent

            die_with_parent(config["die_with"])
    # Counted per user (per user namespace): the server decides when that is meaningful.
    _set_limit(resource.RLIMIT_NPROC, limits.get("nproc", 0))


def _claim_protocol_fds() -> BlockingChannel:
    """Keep stdin/stdout for frames; user code's print() goes to stderr instead."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return BlockingChannel(read_fd, write_fd)


def preload(names: Sequence[str]) -> None:
    """Import what ``TABSERVE_WORKER_PRELOAD`` names, before any user code runs."""
    for name in names:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process; ``argv`` is ``[CONFIG_JSON]``.

    ``server.launcher`` starts ``python -c <bootstrap> <dir holding tabserve> CONFIG_JSON``:
    the bootstrap puts that directory first on ``sys.path`` (without an environment variable
    scripts could see), removes it from ``sys.argv`` and calls this.
    """
    args = sys.argv[1:] if argv is None else argv
    config: dict[str, Any] = orjson.loads(args[0]) if args else {"request_limit": 100 * 1024 * 1024}
    return serve(config)


def serve(config: dict[str, Any]) -> int:
    """Confine this process, greet the server and run jobs until it closes the channel.

    Called by ``main`` in a fresh interpreter, and by the zygote in a freshly forked child.
    ``config["channel"]`` is the socket frames travel on (without it: stdin and stdout).
    """
    logs.configure(
        config.get("log_level", "INFO"),
        config.get("log_format", "text"),
        config.get("log_file"),
        tag=f"worker[{os.getpid()}]",
    )
    if "channel" in config:
        # Not inherited by what a script executes: only the worker speaks on it.
        os.set_inheritable(config["channel"], False)
        channel = BlockingChannel(config["channel"], config["channel"])
    else:
        channel = _claim_protocol_fds()
    tables = fdpass.BlockingFdChannel(config["fd_channel"]) if "fd_channel" in config else None
    if tables is not None:
        os.set_inheritable(config["fd_channel"], False)
    preload(config.get("preload", ()))
    worker = Worker(config)
    confine(worker, config)
    # User code yields the CPU to the server's event loop, so /info and health checks stay
    # quick while every worker is busy; on an idle machine this changes nothing.
    os.nice(WORKER_NICENESS)
    channel.send(Greeting(ready=True, pid=os.getpid()))
    while True:
        fds: list[int] = []
        try:
            header, payload = channel.receive()
            if header.get("fds") and tables is not None:
                fds = tables.receive(header.get("fd_seq", 0), header["fds"])
        except (ProtocolError, fdpass.FdProtocolError, OSError):
            return 0  # the server went away or is shutting us down
        if header.get("kind") == JobKind.CONTEXT:
            worker.set_context(orjson.loads(payload))  # for the jobs that follow; no answer
            continue
        try:
            reply, body = worker.handle(header, payload, fds)  # type: ignore[arg-type]
        finally:
            fdpass.close_all(fds)
        if worker.outgoing_fds and tables is not None:
            # Before the reply: the server reads these once the reply announces them.
            tables.send(header.get("fd_seq", 0), worker.outgoing_fds)
            reply.update(fds=len(worker.outgoing_fds), fd_seq=header.get("fd_seq", 0))
        fdpass.close_all(worker.outgoing_fds)
        worker.outgoing_fds = []
        try:
            channel.send(reply, body)
        except OSError:
            return 0  # the server went away (or killed us) while the job ran
        # Free the job's request, result and answer now, not when the next job replaces
        # them: an idle worker should not hold the last call's megabytes.
        worker.spent = None
        del payload, body
        if reply.get("recycle"):
            return 0


if __name__ == "__main__":
    sys.exit(main())
