"""tabserve: a TabPy-compatible server for Tableau Analytics Extensions.

Importing the package is cheap: it loads the error classes (which import nothing) and
loads the client, with ``requests`` and ``cloudpickle``, only when ``Client``, ``Server`` or
one of their types is first used. Server modules are never imported from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BadRequest,
    EndpointNotFound,
    EvaluateDisabled,
    Forbidden,
    JobCancelled,
    JobFailed,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ScriptError,
    ScriptTimeout,
    TabserveError,
    Unauthorized,
    UnsupportedEncoding,
    WorkerDied,
)

if TYPE_CHECKING:
    from .client import (
        APIKeyAuth,
        BasicAuth,
        Client,
        Direction,
        Endpoint,
        EndpointExists,
        EndpointItem,
        EndpointStatus,
        Field,
        Filter,
        JobItem,
        JobStatus,
        KeyItem,
        Operator,
        Pager,
        PaginationItem,
        PublishMode,
        QueryResponse,
        RequestOptions,
        ResultItem,
        Server,
        ServerInfoItem,
        Sort,
        UserItem,
    )

__version__ = "0.2.0"

__all__ = [
    "APIKeyAuth",
    "BadRequest",
    "BasicAuth",
    "Client",
    "Direction",
    "Endpoint",
    "EndpointExists",
    "EndpointItem",
    "EndpointNotFound",
    "EndpointStatus",
    "EvaluateDisabled",
    "Field",
    "Filter",
    "Forbidden",
    "JobCancelled",
    "JobFailed",
    "JobItem",
    "JobStatus",
    "KeyItem",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "Operator",
    "Overloaded",
    "Pager",
    "PaginationItem",
    "PayloadTooLarge",
    "PublishMode",
    "QueryResponse",
    "RequestOptions",
    "ResultItem",
    "ScriptError",
    "ScriptTimeout",
    "Server",
    "ServerInfoItem",
    "Sort",
    "TabserveError",
    "Unauthorized",
    "UnsupportedEncoding",
    "UserItem",
    "WorkerDied",
]

_CLIENT_NAMES = frozenset(
    {
        "APIKeyAuth", "BasicAuth", "Client", "Direction", "Endpoint", "EndpointExists",
        "EndpointItem", "EndpointStatus", "Field", "Filter", "JobItem", "JobStatus", "KeyItem",
        "Operator", "Pager", "PaginationItem", "PublishMode", "QueryResponse", "RequestOptions",
        "ResultItem", "Server", "ServerInfoItem", "Sort", "UserItem",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    # PEP 562: the server imports this package too, and must not pay for requests.
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'tabserve' has no attribute {name!r}")
