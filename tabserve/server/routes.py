"""The one route table: each route's path, handler, permissions and whether it is public.

Everything else about routing is derived from it: the Tornado URL patterns (``app.make_app``),
the ``route`` label of metrics and of the access log, and the ``paths`` of the OpenAPI
document (``openapi.document``). A new route is one line here, plus its description in
``openapi`` and docs/api.md (tests/test_openapi.py checks both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..config import Settings
from .handlers import (
    AssetHandler,
    BaseHandler,
    EndpointHandler,
    EndpointsHandler,
    EvaluateHandler,
    InfoHandler,
    JobHandler,
    JobsHandler,
    KeyHandler,
    KeysHandler,
    LiveHandler,
    MetricsHandler,
    NotFoundHandler,
    OpenApiHandler,
    QueryHandler,
    QueryResultFileHandler,
    QueryResultHandler,
    ReadyHandler,
    RootHandler,
    StatusHandler,
    UploadDestinationHandler,
    UserHandler,
    UsersHandler,
)

# The verbs a route can implement; BaseHandler answers the others (405, and CORS preflights).
VERBS = ("get", "post", "put", "delete", "patch")
_PARAMETER = re.compile(r"\{[a-z_]+\}")


@dataclass(frozen=True)
class Route:
    """One route. ``path`` is an OpenAPI path template: literal segments and ``{name}``s."""

    path: str
    handler: type[BaseHandler]
    # The permission each verb needs beyond a valid login (see store.passwords.PERMISSION_ORDER).
    permissions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Further permissions only a bearer token needs, where TabPy binds an endpoint scope to a
    # route that password-file users may call freely.
    token_permissions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The verbs an endpoint key may call here, and how its endpoint is checked: "name" (the
    # path's {name} must be the key's endpoint), or "resource" (the handler checks what it
    # serves only what jobs.can_see lets the key see: a 404 otherwise). Any other verb or
    # route refuses such a key with 403 (BaseHandler._authenticate).
    endpoint_keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The verbs that accept an API key as ``?api_key=``: downloads a browser or spreadsheet
    # fetches by URL, which cannot send a header. Anywhere else it is a 401.
    key_in_url: frozenset[str] = frozenset()
    # Answered without credentials when authentication is on; a function of the settings
    # where a setting decides.
    public: bool | Callable[[Settings], bool] = False
    trailing_slash: bool = False  # also answers at path + "/", as TabPy's does
    label: str = ""  # the metrics and access-log label when it is not the path

    def is_public(self, settings: Settings) -> bool:
        return self.public if isinstance(self.public, bool) else self.public(settings)

    @property
    def name(self) -> str:
        """The ``route`` label of metrics and the access log: bounded, unlike raw paths."""
        return self.label or self.path

    @property
    def pattern(self) -> str:
        """The Tornado URL pattern: each ``{parameter}`` matches one path segment."""
        literals = _PARAMETER.split(self.path)
        pattern = "([^/]+)".join(re.escape(literal) for literal in literals)
        return pattern + ("/?" if self.trailing_slash else "")

    @property
    def methods(self) -> tuple[str, ...]:
        """The verbs the handler implements itself (lower case, as OpenAPI writes them)."""
        own = [cls for cls in self.handler.__mro__ if issubclass(cls, BaseHandler)]
        own = own[: own.index(BaseHandler)]
        return tuple(verb for verb in VERBS if any(verb in cls.__dict__ for cls in own))


def _metrics_public(settings: Settings) -> bool:
    return not settings.metrics_auth


# Result downloads: GET, and HEAD (a spreadsheet may look before it fetches).
_DOWNLOAD_VERBS = frozenset({"GET", "HEAD"})
_DOWNLOAD_KEYS = MappingProxyType({"GET": "resource", "HEAD": "resource"})

# In the order /openapi.json lists them. /evaluate declares no permission: its handler checks
# 'evaluate' itself, because Tableau's connection test is allowed without it.
ROUTES: tuple[Route, ...] = (
    # The status page and what it loads are public, as TabPy's static files are; the API
    # calls the page makes are not.
    Route("/", RootHandler, public=True),
    Route("/assets/{name}", AssetHandler, public=True),
    Route("/openapi.json", OpenApiHandler, public=True),
    # For machines: probes never need credentials; /metrics as TABSERVE_METRICS_AUTH says.
    Route("/health/live", LiveHandler, public=True),
    Route("/health/ready", ReadyHandler, public=True),
    Route("/metrics", MetricsHandler, public=_metrics_public),
    Route("/info", InfoHandler),
    Route("/evaluate", EvaluateHandler),
    Route("/status", StatusHandler),
    Route("/endpoints", EndpointsHandler, {"POST": "manage"}, trailing_slash=True),
    Route("/endpoints/{name}", EndpointHandler, {"PUT": "manage", "DELETE": "manage"}),
    Route(
        "/query/{name}",
        QueryHandler,
        {"GET": "query", "POST": "query"},
        endpoint_keys={"GET": "name", "POST": "name"},
    ),
    # Asynchronous jobs and their results (Prefer: respond-async): any authenticated user,
    # who sees only their own unless they may manage, and an endpoint key only its
    # endpoint's (jobs.can_see: a 404 otherwise, so ids do not leak). Endpoint keys read.
    Route("/jobs", JobsHandler, endpoint_keys={"GET": "resource"}),
    Route("/jobs/{id}", JobHandler, endpoint_keys={"GET": "resource"}),
    # The downloads first: the plain route's {id} would match "x.csv" too.
    Route(
        "/query_results/{id}.json",
        QueryResultFileHandler,
        endpoint_keys=_DOWNLOAD_KEYS,
        key_in_url=_DOWNLOAD_VERBS,
    ),
    Route(
        "/query_results/{id}.csv",
        QueryResultFileHandler,
        endpoint_keys=_DOWNLOAD_KEYS,
        key_in_url=_DOWNLOAD_VERBS,
    ),
    Route("/query_results/{id}", QueryResultHandler, endpoint_keys={"GET": "resource"}),
    # TabPy binds the deploy scope to this route; password-file users need no permission.
    Route(
        "/configurations/endpoint_upload_destination",
        UploadDestinationHandler,
        token_permissions={"GET": "manage"},
    ),
    # The store's users (TABSERVE_USERS = store; 404 otherwise), for manage users only.
    Route("/users", UsersHandler, {"GET": "manage", "POST": "manage"}),
    Route("/users/{name}", UserHandler, {"GET": "manage", "PUT": "manage", "DELETE": "manage"}),
    # API keys: 404 while authentication is off (keys would be refused anyway).
    Route("/keys", KeysHandler, {"GET": "manage", "POST": "manage"}),
    Route("/keys/{key_id}", KeyHandler, {"GET": "manage", "DELETE": "manage"}),
)

# Every path no route matches: public, as in TabPy (a 401 would claim the path exists).
UNMATCHED = Route("", NotFoundHandler, public=True, label="unmatched")


def route_for(path: str) -> Route:
    """The route declared for ``path`` (a template, e.g. ``/endpoints/{name}``)."""
    for route in ROUTES:
        if route.path == path:
            return route
    raise KeyError(path)
