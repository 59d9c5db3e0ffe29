"""What runs in the user's notebook: two entry points over one transport.

``Client`` (``tabpy_client``) is TabPy's flat API, for notebooks written for TabPy.
``Server`` (``resources``) is the resource-style API in the shape of Tableau Server Client:
``server.endpoints``, ``server.jobs``, ``server.results``, ``server.keys``, ``server.users``,
with typed items (``items``) and paging (``options``). Both send through ``transport``.

This package imports nothing from tabserve but ``errors`` (an import contract checks it), so
it never loads tornado, numpy, pandas or any server module. ``tabserve.Client`` and
``tabserve.Server`` are this package's, loaded on first use.
"""

from .items import (
    EndpointItem,
    JobItem,
    JobStatus,
    KeyItem,
    PaginationItem,
    PublishMode,
    ResultItem,
    ServerInfoItem,
    UserItem,
)
from .options import Direction, Field, Filter, Operator, Pager, QuerySet, RequestOptions, Sort
from .resources import APIKeyAuth, BasicAuth, Server
from .tabpy_client import (
    Client,
    Endpoint,
    EndpointExists,
    EndpointStatus,
    Job,
    QueryObject,
    QueryResponse,
)

__all__ = [
    "APIKeyAuth",
    "BasicAuth",
    "Client",
    "Direction",
    "Endpoint",
    "EndpointExists",
    "EndpointItem",
    "EndpointStatus",
    "Field",
    "Filter",
    "Job",
    "JobItem",
    "JobStatus",
    "KeyItem",
    "Operator",
    "Pager",
    "PaginationItem",
    "PublishMode",
    "QueryObject",
    "QueryResponse",
    "QuerySet",
    "RequestOptions",
    "ResultItem",
    "Server",
    "ServerInfoItem",
    "Sort",
    "UserItem",
]
