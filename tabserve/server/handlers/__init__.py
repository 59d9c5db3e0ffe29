"""HTTP handlers: parse the request, call a service, write the answer. Nothing more.

``base`` holds ``BaseHandler``, which every handler derives from and which owns the
cross-cutting rules (authentication, streamed size-checked bodies, the one error renderer,
call ids, the access log); ``api`` the Analytics Extensions and TabPy routes; ``pages`` the
status page and the OpenAPI document; ``jobs`` asynchronous jobs and their results;
``keys`` the API keys; ``operations`` the health probes and metrics.
"""

from .api import (
    EndpointHandler,
    EndpointsHandler,
    EvaluateHandler,
    InfoHandler,
    QueryHandler,
    StatusHandler,
    UploadDestinationHandler,
    UserHandler,
    UsersHandler,
)
from .base import (
    DRAIN_LIMIT,
    BaseHandler,
    NotFoundHandler,
    log_request,
)
from .jobs import JobHandler, JobsHandler, QueryResultFileHandler, QueryResultHandler
from .keys import KeyHandler, KeysHandler
from .operations import LiveHandler, MetricsHandler, ReadyHandler
from .pages import AssetHandler, OpenApiHandler, RootHandler

__all__ = [
    "DRAIN_LIMIT",
    "AssetHandler",
    "EndpointHandler",
    "EndpointsHandler",
    "EvaluateHandler",
    "InfoHandler",
    "JobHandler",
    "JobsHandler",
    "KeyHandler",
    "KeysHandler",
    "BaseHandler",
    "LiveHandler",
    "MetricsHandler",
    "NotFoundHandler",
    "OpenApiHandler",
    "QueryHandler",
    "QueryResultFileHandler",
    "QueryResultHandler",
    "ReadyHandler",
    "RootHandler",
    "StatusHandler",
    "UploadDestinationHandler",
    "UserHandler",
    "UsersHandler",
    "log_request",
]
