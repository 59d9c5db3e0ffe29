"""The one error hierarchy of tabserve.

Every error a caller may see is a ``TabserveError``; the class carries the HTTP status,
and the instance carries TabPy's envelope fields ``message`` and ``info``. The server
renders them in exactly one place (``server.handlers.base.BaseHandler.write_error``);
workers send them over the pipe with ``to_wire``/``from_wire``; the client raises them from
responses.

    TabserveError (500)
    ├── BadRequest (400)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    │   └── InsufficientScope
    ├── NotFound (404)
    │   ├── EvaluateDisabled
    │   └── EndpointNotFound
    ├── MethodNotAllowed (405)
    ├── NotAcceptable (406)
    ├── ScriptTimeout (408)
    ├── PayloadTooLarge (413)
    ├── UnsupportedEncoding (415)
    ├── ScriptError (500)
    │   └── WorkerDied
    ├── Overloaded (503)
    ├── SandboxUnavailable (503)
    ├── FlightUnavailable (503)
    ├── StoreUnavailable (503)
    ├── InsufficientStorage (507)
    ├── JobFailed (500, raised by the client: an asynchronous job ended FAILURE)
    └── JobCancelled (409, raised by the client: an asynchronous job ended CANCELLED)

This module imports nothing from tabserve, so the client and the worker can use it.
"""

from __future__ import annotations

from typing import Any, ClassVar

Info = dict[str, Any] | str


class TabserveError(Exception):
    """Base for every error a caller may see."""

    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "Internal server error"

    def __init__(self, message: str | None = None, info: Info | None = None) -> None:
        self.message = message if message is not None else self.default_message
        self.info: Info = info if info is not None else {}
        # What a worker reported about the failed job (pid, timings), for the access log.
        self.meta: dict[str, Any] = {}
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.info:
            return f"{self.message}: {self.info}"
        return self.message

    def envelope(self) -> dict[str, Any]:
        """The body every error response carries: TabPy's ``{"message", "info"}``."""
        return {"message": self.message, "info": self.info}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error needs (e.g. Retry-After)."""
        return {}

    def to_wire(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "info": self.info}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> TabserveError:
        """Rebuild an error sent by a worker or a server, picking the class by status."""
        return error_for_status(int(data["status"]), data.get("message"), data.get("info"))


class BadRequest(TabserveError):
    status = 400
    default_message = "Bad request"


def _quoted(text: str) -> str:
    # A quoted-string (RFC 7235): quotes and backslashes are escaped, and a control character
    # would make the header invalid.
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _challenge(realm: str, scheme: str = "Basic", **params: str) -> dict[str, str]:
    fields = [f"realm={_quoted(realm)}"] + [f"{k}={_quoted(v)}" for k, v in params.items()]
    return {"WWW-Authenticate": f"{scheme} {', '.join(fields)}"}


class Unauthorized(TabserveError):
    """Credentials are missing or wrong; ``realm`` is the service name from state.ini.

    ``scheme`` is the challenge's: ``Bearer`` when a token was expected (RFC 6750), with
    ``error="invalid_token"`` when one was sent.
    """

    status = 401
    default_message = "Invalid credentials provided."

    def __init__(
        self,
        message: str | None = None,
        info: Info | None = None,
        *,
        realm: str = "TabPy Server",
        scheme: str = "Basic",
        token_sent: bool = False,
    ) -> None:
        super().__init__(message, info if info is not None else "Unauthorized request.")
        self.realm = realm
        self.scheme = scheme
        self.token_sent = token_sent

    def headers(self) -> dict[str, str]:
        if self.scheme == "Bearer" and self.token_sent:
            return _challenge(self.realm, "Bearer", error="invalid_token")
        return _challenge(self.realm, self.scheme)


class Forbidden(TabserveError):
    status = 403
    default_message = "Forbidden"


class InsufficientScope(Forbidden):
    """A valid bearer token without the route's endpoint scope (TabPy's 403 and header)."""

    default_message = "Token is missing a required endpoint scope."

    def __init__(self, scope: str, *, realm: str = "TabPy Server") -> None:
        super().__init__(info=f"Forbidden request. This needs the '{scope}' scope.")
        self.scope = scope
        self.realm = realm

    def headers(self) -> dict[str, str]:
        return _challenge(self.realm, "Bearer", error="insufficient_scope", scope=self.scope)


class NotFound(TabserveError):
    status = 404
    default_message = "Not found"


class EvaluateDisabled(NotFound):
    default_message = (
        "Ad-hoc scripts have been disabled on this analytics extension, "
        "please contact your administrator."
    )


class EndpointNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__("UnknownURI", f"Endpoint '{name}' does not exist")
        self.name = name


class MethodNotAllowed(TabserveError):
    status = 405
    default_message = "Method not allowed"


class NotAcceptable(TabserveError):
    """Credentials were sent to a server without authentication (TabPy answers 406 too)."""

    status = 406
    default_message = "Username or password provided when authentication not available."

    def __init__(
        self, message: str | None = None, info: Info | None = None, *, realm: str = "TabPy Server"
    ) -> None:
        super().__init__(message, info if info is not None else "Not Acceptable")
        self.realm = realm

    def headers(self) -> dict[str, str]:
        # TabPy sends the challenge with its 406 as well; clients may rely on it.
        return _challenge(self.realm)


class ScriptTimeout(TabserveError):
    status = 408
    default_message = "User defined script timed out."

    @classmethod
    def after(cls, timeout: float) -> ScriptTimeout:
        # TabPy prints the configured value with str(), so 2 from a config file reads "2.0".
        return cls(f"User defined script timed out. Timeout is set to {timeout} s.")


class PayloadTooLarge(TabserveError):
    status = 413

    @classmethod
    def for_size(cls, size: int | str, limit: int) -> PayloadTooLarge:
        return cls(
            f"Request with size {size} exceeded limit of {limit} (bytes).",
            "Request Entity Too Large",
        )


class UnsupportedEncoding(TabserveError):
    status = 415
    default_message = "Unsupported Content-Encoding"


class ScriptError(TabserveError):
    """User code failed: TabPy's 500 ``Error processing script``."""

    status = 500
    default_message = "Error processing script"


class WorkerDied(ScriptError):
    """The worker process running the request died (crash, kill, memory cap)."""


class Overloaded(TabserveError):
    status = 503
    default_message = "Server is busy: the request queue is full"
    retry_after = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class SandboxUnavailable(TabserveError):
    """The sandbox self-check failed, so user code is refused rather than run unconfined.

    503, not 403: the client did nothing wrong and may retry once an administrator has
    fixed the server; no Retry-After, because waiting alone will not fix it.
    """

    status = 503
    default_message = (
        "Running this code is refused: the sandbox that should isolate it is not working on "
        "this server, please contact your administrator."
    )


class FlightUnavailable(TabserveError):
    """The Arrow Flight server is not running (restarting, or stopped by a shutdown action)."""

    status = 503
    default_message = "The Arrow Flight server is not available"


class StoreUnavailable(TabserveError):
    """The store (PostgreSQL) cannot be reached just now: changes are refused, while what is
    loaded keeps serving. Waiting is the fix, hence Retry-After."""

    status = 503
    default_message = "The store is unavailable: changes cannot be saved now; retry shortly"
    retry_after = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class InsufficientStorage(TabserveError):
    """The state directory is full (ENOSPC, EDQUOT): the change was not made, nothing that
    was stored before is touched, and the server keeps serving. Retry once space is freed."""

    status = 507
    default_message = "Not enough space to store the change"


class JobFailed(TabserveError):
    """The job ended FAILURE; ``message`` is the server's, what a synchronous call would
    have raised. Raised by the client's ``wait_for_job``, never sent by the server."""

    status = 500
    default_message = "The job failed"

    def __init__(self, message: str | None = None, info: Info | None = None, job: Any = None):
        super().__init__(message, info)
        self.job = job  # the JobItem as last seen


class JobCancelled(TabserveError):
    """The job ended CANCELLED (``DELETE /jobs/<id>``). Raised by ``wait_for_job``."""

    status = 409
    default_message = "The job was cancelled"

    def __init__(self, message: str | None = None, info: Info | None = None, job: Any = None):
        super().__init__(message, info)
        self.job = job


_BY_STATUS: dict[int, type[TabserveError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        NotAcceptable,
        ScriptTimeout,
        PayloadTooLarge,
        UnsupportedEncoding,
        ScriptError,
        Overloaded,
        InsufficientStorage,
    )
}


def error_for_status(status: int, message: str | None, info: Info | None) -> TabserveError:
    """An error of the class that owns ``status``; an unknown status keeps its number."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message, info)
    err = TabserveError(message, info)
    err.status = status  # type: ignore[misc]
    return err
