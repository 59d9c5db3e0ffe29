"""tabserve: a TabPy-compatible server for Tableau Analytics Extensions.

Importing the package is cheap: it loads the error classes (which import nothing) and
loads the client, with ``requests`` and ``cloudpickle``, only when ``Client`` or one of its
types is first used. Server modules are never imported from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BadRequest,
    EndpointNotFound,
    EvaluateDisabled,
    Forbidden,
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
    from .client import Client, Endpoint, EndpointExists, EndpointStatus, QueryResponse

__version__ = "0.2.0"

__all__ = [
    "BadRequest",
    "Client",
    "Endpoint",
    "EndpointExists",
    "EndpointNotFound",
    "EndpointStatus",
    "EvaluateDisabled",
    "Forbidden",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "QueryResponse",
    "ScriptError",
    "ScriptTimeout",
    "TabserveError",
    "Unauthorized",
    "UnsupportedEncoding",
    "WorkerDied",
]

_CLIENT_NAMES = frozenset(
    {"Client", "Endpoint", "EndpointExists", "EndpointStatus", "QueryResponse"}
)


def __getattr__(name: str) -> Any:
    # PEP 562: the server imports this package too, and must not pay for requests.
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'tabserve' has no attribute {name!r}")
