"""HTTP handlers: parse the request, call a service, write the answer. Nothing more.

Every handler derives from ``BaseHandler``, which owns the cross-cutting rules: requests are
authenticated before anything else (``auth.Authenticator``; the route table says whether a
route is public and the permission each verb needs), request bodies are streamed and
size-checked here (so Tornado never parses a JSON body as a form, and an oversized body gets
TabPy's 413 on every route), errors are rendered in one place as TabPy's
``{"message", "info"}`` envelope, and answers are JSON unless a handler says otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from tornado.escape import utf8
from tornado.httputil import HTTPHeaders, format_timestamp, responses
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from ... import logs
from ...errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TabserveError,
    error_for_status,
)
from ..auth import ANONYMOUS
from ..credentials import User
from ..heap import heap
from ..paging import PARAMETERS as PAGING_PARAMETERS

if TYPE_CHECKING:
    from ..app import Services
    from ..routes import Route

log = logging.getLogger("tabserve.http")
access_log = logging.getLogger("tabserve.access")

# An incoming X-Request-Id is reused as the call id only if it is short and plain: it is
# echoed in a header and written to the log.
_CALL_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# A call id we make is 32 hex digits: a random per-process prefix and a counter. As unique as
# a uuid4 across processes and restarts, without a urandom system call per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_call_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


class _DateHeader:
    """The ``Date`` header, formatted once a second instead of once a response."""

    second = -1
    text = ""

    @classmethod
    def now(cls) -> str:
        now = time.time()
        if int(now) != cls.second:
            cls.second, cls.text = int(now), format_timestamp(now)
        return cls.text


# An oversized body is read and thrown away (so the client, still sending, can read our 413)
# up to this much past the limit; beyond it the connection is closed instead.
DRAIN_LIMIT = 64 * 1024 * 1024
# An answer larger than this is written after its headers rather than joined to them.
SEPARATE_BODY = 1024 * 1024

_Verb = TypeVar("_Verb", bound=Callable[..., Awaitable[None] | None])


def _reject_refused(verb: _Verb) -> _Verb:
    @functools.wraps(verb)
    def checked(self: BaseHandler, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        if self._refusal is not None:  # authentication first, as in TabPy
            raise self._refusal
        if self._too_large:
            limit = self.services.settings.max_request_bytes
            raise PayloadTooLarge.for_size(self._declared_size(), limit)
        return verb(self, *args, **kwargs)

    return checked  # type: ignore[return-value]


@stream_request_body
class BaseHandler(RequestHandler):
    """Base of every handler: authentication, streamed size-checked bodies, the error
    envelope, call ids, in-flight tracking. Answers are JSON unless a handler says otherwise
    (the status page's files, Prometheus text)."""

    services: Services
    # Its entry in the route table: permissions, whether public, the metrics label.
    route: Route

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A streamed body is complete only when the verb method starts; guarding each verb
        # is the one place where a refusal (401, 403, 406) or an oversized body can be
        # answered for every route. Every verb Tornado may call is guarded, so a handler
        # that adds one (HEAD, say) cannot skip authentication.
        super().__init_subclass__(**kwargs)
        for method in cls.SUPPORTED_METHODS:
            name = method.lower()
            if name in cls.__dict__:
                setattr(cls, name, _reject_refused(cls.__dict__[name]))

    def initialize(self, services: Services, route: Route) -> None:
        self.services = services
        self.route = route
        self.user: User = ANONYMOUS
        self._chunks: list[bytes] = []
        self._received = 0
        self._too_large = False
        self._refusal: TabserveError | None = None
        self._sent = 0
        # What the worker reported about this request's job (pid, timings, rows), if any.
        self.meta: dict[str, Any] = {}
        self.endpoint: str | None = None  # a deployed endpoint's name, once known to exist
        self.error_summary = ""
        self._tracked = True
        services.requests.begin()
        if services.requests.draining:
            self.set_header("Connection", "close")  # shutting down: send the client elsewhere

    @functools.cached_property
    def call_id(self) -> str:
        incoming = self.request.headers.get("X-Request-Id")
        return incoming if incoming and _CALL_ID.fullmatch(incoming) else new_call_id()

    def clear(self) -> None:
        """The default headers (JSON, no ``Server``, the call id), set directly: Tornado's
        version builds three headers to have ours replace two of them, on every request.
        Error responses start again from here, so the call id is set here, not in prepare."""
        headers = HTTPHeaders()
        headers["Content-Type"] = "application/json"
        headers["Date"] = _DateHeader.now()
        headers["X-Request-Id"] = self.call_id
        services = getattr(self, "services", None)  # None in the first call, from __init__
        if services is not None and services.requests.draining:
            headers["Connection"] = "close"
        self._headers = headers
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = responses[200]

    def _declared_size(self) -> str:
        return self.request.headers.get("Content-Length") or str(self._received)

    @property
    def _expects_continue(self) -> bool:
        return self.request.headers.get("Expect", "").lower() == "100-continue"

    async def prepare(self) -> None:
        logs.call_id.set(self.call_id)  # every log line of this request names it
        # A CORS preflight never carries credentials, so it is answered without them.
        if self.request.method != "OPTIONS" and not self.route.is_public(self.services.settings):
            await self._authenticate()
        limit = self.services.settings.max_request_bytes
        declared = self.request.headers.get("Content-Length")
        if declared is None or not declared.isdigit() or int(declared) <= limit:
            return
        self._too_large = True
        # Tornado would answer a bare HTML 400 for a length over its own cap; ours rules.
        self.request.connection.set_max_body_size(int(declared))  # type: ignore[union-attr]
        if self._expects_continue or int(declared) > limit + DRAIN_LIMIT:
            # The client has not sent the body (or it is huge): answer now and close.
            self.set_header("Connection", "close")
            raise self._refusal or PayloadTooLarge.for_size(declared, limit)

    async def _authenticate(self) -> None:
        auth = self.services.auth
        try:
            method = self.request.method or "GET"
            self.user = await auth.authenticate(
                self.request.headers.get("Authorization"),
                self.request.remote_ip or "?",
                self._api_key_argument(),
                key_in_url=method in self.route.key_in_url,
            )
            # An endpoint key: only routes declared for it, and only its endpoint.
            auth.authorize_route(
                self.user,
                self.route.endpoint_keys.get(method),
                self.path_args[0] if self.path_args else None,
            )
            needed = self.route.permissions.get(method)
            if needed is None and self.user.scopes is not None:
                needed = self.route.token_permissions.get(method)
            auth.authorize(self.user, needed)
        except TabserveError as refusal:
            if self._expects_continue:
                raise  # the client waits for our answer before sending the body
            # Answered once the body is in (by the verb guard): Tornado closes a connection
            # answered before its body is read, and unread bytes turn that close into a
            # reset, which the client sees instead of the 401.
            self._refusal = refusal

    def _api_key_argument(self) -> str | None:
        """``?api_key=`` (for download links, where no header can be set)."""
        values = self.request.query_arguments.get("api_key")
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest("Credentials sent twice", "Give ?api_key= once.")
        try:
            return values[0].decode("ascii")
        except UnicodeDecodeError:
            return "\ufffd"  # not a key: refused as a malformed one (401)

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        limit = self.services.settings.max_request_bytes
        if self._received > limit:
            self._too_large = True
        if self._too_large or self._refusal is not None:
            # Refused: read on, keeping nothing, so that the client (still sending) can read
            # the answer; far beyond the limit, answer now and close instead.
            self._chunks.clear()
            if self._received > limit + DRAIN_LIMIT and not self._finished:
                error = self._refusal or PayloadTooLarge.for_size(self._received, limit)
                self.set_header("Connection", "close")
                self.send_error(error.status, exc_info=(type(error), error, None))
            return
        self._chunks.append(chunk)

    @property
    def body(self) -> bytes:
        self._check_not_handed_over()
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def _check_not_handed_over(self) -> None:
        if self._received and not self._chunks:
            # Its chunks went to a worker (WorkerProcess.call empties the list): an empty
            # body now would be sent or stored in silence.
            raise RuntimeError("the request body was handed to a worker and is gone")

    @property
    def body_parts(self) -> list[bytes]:
        """The body as the chunks it arrived in: what a worker is sent without a join, which
        for a 40 MB body costs the event loop tens of milliseconds (a copy into fresh pages).
        A job empties this list when it sends it (``WorkerProcess.call``): read ``body``
        first if anything needs it later."""
        self._check_not_handed_over()
        return self._chunks if self._chunks else [b""]

    async def json_body(self) -> dict[str, Any]:
        """A JSON object body (management routes); TabPy's 400 messages when it is not.

        A small body is parsed here; a larger one in a thread, in a way that lets the event
        loop run meanwhile (see ``_parse_object``), so that a 40 MB deploy does not hold up
        ``/info`` or the small calls beside it.
        """
        if self._received <= PARSE_INLINE_MAX:
            return _parse_object(self.body)
        chunks, self._chunks = self._chunks, []  # the thread joins them: no 40 MB copy here
        return await asyncio.to_thread(_parse_object, chunks)

    def list_query(self) -> dict[str, str]:
        """A list route's paging parameters (``server.paging``). A repeated ``filter`` or
        ``sort`` adds its clauses to the others; a repeated page parameter keeps the last."""
        query: dict[str, str] = {}
        for name in PAGING_PARAMETERS:
            values = self.get_query_arguments(name)
            if values:
                query[name] = ",".join(values) if name in ("filter", "sort") else values[-1]
        return query

    @property
    def content_encoding(self) -> str:
        return self.request.headers.get("Content-Encoding", "").strip().lower()

    def write(self, chunk: str | bytes | dict[str, Any]) -> None:
        if isinstance(chunk, bytes):
            self._sent += len(chunk)
        elif isinstance(chunk, str):
            chunk = utf8(chunk)
            self._sent += len(chunk)
        super().write(chunk)

    def finish_body(self, body: bytes | bytearray) -> None:
        """Finish with ``body`` as the answer. A large one (a bytearray, as the executor
        receives large answers) goes out after the headers, as it is: Tornado would
        otherwise copy it once more to put the headers in front of it."""
        large = isinstance(body, bytearray) or len(body) > SEPARATE_BODY
        if not large or self.request.method in ("GET", "HEAD"):  # GET: Tornado's Etag
            self.finish(bytes(body) if isinstance(body, bytearray) else body)
            return
        self.set_header("Content-Length", str(len(body)))  # or Tornado would send it chunked
        self.flush()
        connection = self.request.connection
        assert connection is not None
        # Past RequestHandler.write, which takes only bytes: the stream takes any buffer.
        connection.write(body)  # type: ignore[arg-type]
        self._sent += len(body)
        self.finish()

    def on_finish(self) -> None:
        self._untrack()
        heap.after(self._received + self._sent)  # a large call's buffers go back to the system
        request = self.request
        self.services.metrics.observe(
            self.route.name,
            request.method or "",
            self.get_status(),
            request.request_time(),
            self._received,
            self._sent,
            self.meta,
            self.endpoint,
        )

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._untrack()  # the client is gone: shutdown need not wait for this answer

    def _untrack(self) -> None:
        if self._tracked:
            self._tracked = False
            self.services.requests.end()

    def add_cors_headers(self) -> None:
        for key, value in self.services.service.cors:
            self.set_header(key, value)

    def keep_private(self) -> None:
        """For answers about jobs and results: their data is the caller's, and the URL may
        hold an API key (downloads). No cache keeps them, and a page they open tells no
        other site where it came from."""
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")

    def write_json(self, value: Any, status: int = 200) -> None:
        """Write a small control-plane document with TabPy's separators."""
        self.set_status(status)
        self.finish(json.dumps(value))

    @_reject_refused
    async def get(self, *args: str) -> None:
        raise MethodNotAllowed(
            "Method not allowed", f"{self.request.method} is not supported on {self.request.path}"
        )

    # Every verb Tornado supports but OPTIONS: a route answers 405 (after authentication)
    # for those its handler does not implement, HEAD included (Tornado's own would skip it).
    post = put = delete = patch = head = get

    @_reject_refused
    async def options(self, *args: str) -> None:
        """CORS preflight: the configured headers and TabPy's answer, 200 with ``{}``."""
        self.add_cors_headers()
        self.write_json({})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one place errors become responses: TabPy's envelope, JSON, never HTML."""
        error = _as_tabserve_error(status_code, kwargs.get("exc_info"), self.call_id)
        self.meta = error.meta
        self.error_summary = error.message
        self.set_status(error.status)
        for key, value in error.headers().items():
            self.set_header(key, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.envelope()))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, TabserveError | HTTPError):
            return  # an answer, not a fault: the access log line records it
        if isinstance(value, StreamClosedError):
            log.info("client closed the connection before the answer")
            return
        # Not Tornado's version: it logs the request's headers, credentials included.
        log.error(
            "unexpected error in %s %s", self.request.method, self.route.name,
            exc_info=(typ, value, tb),
        )  # fmt: skip


# Management bodies up to this size are parsed on the event loop (well under a millisecond);
# larger ones in a thread.
PARSE_INLINE_MAX = 64 * 1024


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def _float(text: str) -> float:
    return float(text)


def _int(text: str) -> int:
    return int(text)


def _parse_object(body: bytes | list[bytes]) -> dict[str, Any]:
    """Parse a management body; ``chunks`` (a list) are joined first, and parsed with hooks.

    The stdlib parser is one C call that holds the GIL until the whole document is built, so
    a thread alone would not free the event loop. With a Python hook per object and number,
    the parser runs Python code at every value, where the interpreter hands the GIL to the
    event loop when it asks (every 5 ms): slower in the thread, but the loop keeps serving.
    What still holds the GIL in one piece is one long string value (about 2 ms per MB) and,
    on the loop, freeing the document. The result is what ``json.loads`` gives.
    """
    threaded = isinstance(body, list)
    if threaded:
        body = b"".join(body)
    if not body.strip():
        raise BadRequest("Input body cannot be empty")
    try:
        if threaded:
            value = json.loads(body, object_pairs_hook=_object, parse_float=_float, parse_int=_int)
        else:
            value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("Failed to decode input body", str(exc) or "nested too deeply") from None
    if not isinstance(value, dict):
        raise BadRequest("Input body must be a JSON object")
    return value


def _as_tabserve_error(status_code: int, exc_info: Any, call_id: str) -> TabserveError:
    value = exc_info[1] if exc_info else None
    if isinstance(value, TabserveError):
        return value
    if isinstance(value, HTTPError) and status_code < 500:
        # Tornado's own refusals (a 405 for an unknown method, undecodable path arguments).
        try:
            reason = HTTPStatus(status_code).phrase
        except ValueError:
            reason = "Bad request"
        return error_for_status(status_code, reason, value.log_message or {})
    # Never echo an unexpected exception: its text may carry paths or internals.
    return TabserveError(
        "Internal server error", f"The server failed; its log has the details under call {call_id}."
    )


class NotFoundHandler(BaseHandler):
    """Every path no route matches: a JSON 404 for any method, never Tornado's HTML page."""

    async def get(self, *args: str) -> None:
        raise NotFound("Not found", f"No route for {self.request.method} {self.request.path}")

    post = put = delete = patch = head = get


def log_request(handler: RequestHandler) -> None:
    """One access-log line per request (Tornado's log_function hook).

    The fields are gathered only when the line is going to be written: the level check comes
    first, so a disabled access log costs one comparison.
    """
    status = handler.get_status()
    level = logging.INFO if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level) or not isinstance(handler, BaseHandler):
        return
    request = handler.request
    meta = handler.meta
    fields: dict[str, Any] = {
        "call_id": handler.call_id,
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(1000.0 * request.request_time(), 1),
        "route": handler.route.name,
        "endpoint": handler.endpoint or meta.get("model"),
        "version": meta.get("version"),
        "rows_in": meta.get("rows_in"),
        "rows_out": meta.get("rows_out"),
        "bytes_in": handler._received,
        "bytes_out": handler._sent,
        "queue_ms": meta.get("queue_ms"),
        "exec_ms": meta.get("exec_ms"),
        "worker_pid": meta.get("worker_pid"),
        "script_hash": meta.get("script_hash"),
        "error": handler.error_summary or None,
    }
    if handler.services.settings.log_details:
        # TABPY_LOG_DETAILS: who called, as TabPy logs it. Off by default (it names users).
        headers = request.headers
        fields["caller"] = request.remote_ip
        fields["client"] = headers.get("TabPy-Client")
        fields["user"] = headers.get("TabPy-User")
        # Who authenticated, as TabPy logs it: the password-file user, or a token's sub with
        # TABPY_OAUTH_LOG_USER (otherwise a token's caller stays unnamed).
        fields["auth_user"] = handler.user.name or None
    summary = f"{request.method} {request.path} {status} {fields['duration_ms']}ms"
    # The record is made directly: Logger.log would walk the stack for a caller's file and
    # line on every request, which no access line shows.
    access_log.handle(
        access_log.makeRecord(
            access_log.name, level, __file__, 0, logs.AccessRecord(summary, fields), (), None
        )
    )
