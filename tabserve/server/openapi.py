"""The OpenAPI 3.1 description of tabserve's HTTP API, served at ``GET /openapi.json``.

The paths and their verbs come from the route table (``routes.ROUTES``); what each operation
takes and answers is written here by hand, from docs/api.md. ``tests/test_openapi.py``
checks it against the doc, and a schemathesis run checks every answer of a live server
against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import __version__
from .routes import VERBS, Route

JSON = "application/json"

_ENVELOPE = {
    "type": "object",
    "description": "TabPy's error envelope; every error has it.",
    "required": ["message", "info"],
    "properties": {
        "message": {"type": "string"},
        "info": {"anyOf": [{"type": "string"}, {"type": "object"}]},
    },
}

_ERRORS = {
    "400": "The request is malformed; the message says what is wrong.",
    "401": "Authentication is on and the credentials are missing or wrong.",
    "403": "The user may not use this route (a bearer token: it lacks the route's scope; an "
    "endpoint key: not its endpoint's /query).",
    "404": "Unknown path, endpoint or API key, or /evaluate disabled (or /keys with "
    "authentication off).",
    "405": "The method is not supported on this path.",
    "406": "Credentials were sent to a server without authentication.",
    "408": "The script or endpoint ran out of time.",
    "413": "The body (or the inflated gzip body) is over TABPY_MAX_REQUEST_SIZE_MB.",
    "415": "A Content-Encoding this server does not accept.",
    "500": "Error processing script, or the worker running it failed.",
    "503": "Every worker is busy and the queue is full (Retry-After: 1); with Prefer: "
    "respond-async, too many jobs are queued (Retry-After: 5); or, for a change to "
    "endpoints, the store cannot be written.",
    "507": "The state directory is full: the change was not stored (nothing else changed).",
}

_ANY_JSON = {"description": "Any JSON value: the script's or function's result."}

_ENDPOINT = {
    "type": "object",
    "description": "A deployed endpoint, as TabPy describes it.",
    "properties": {
        "description": {"type": "string"},
        "type": {"type": "string", "enum": ["model", "alias"]},
        "version": {"type": "integer"},
        "dependencies": {"type": "array", "items": {"type": "string"}},
        "target": {"type": ["string", "null"]},
        "creation_time": {"type": ["number", "string"]},
        "last_modified_time": {"type": ["number", "string"]},
        "schema": {"description": "As the client sent it: TabPy's client sends a str()."},
        "is_public": {"type": "boolean"},
        "docstring": {"type": "string"},
        "python_version": {"type": "string"},
        "cloudpickle_version": {"type": "string"},
        "signature": {"type": "string"},
        "max_age": {"type": "integer", "minimum": 0},
    },
}

_MAX_AGE = {
    "type": "integer",
    "minimum": 0,
    "description": "Accept a cached result retrieved within this many seconds (0: always run; "
    "absent: never cached, unless the endpoint or TABSERVE_EVALUATE_MAX_AGE gives a default). "
    "A hit carries an Age header.",
}

_JOB = {
    "type": "object",
    "required": ["job"],
    "properties": {
        "job": {
            "type": "object",
            "required": ["id", "status", "error", "query_result_id", "created_at", "updated_at"],
            "properties": {
                "id": {"type": "string"},
                "status": {
                    "type": "integer",
                    "enum": [1, 2, 3, 4, 5],
                    "description": "1 pending, 2 started, 3 success, 4 failure, 5 cancelled",
                },
                "error": {
                    "anyOf": [{"type": "null"}, {"$ref": "#/components/schemas/Error"}],
                    "description": "Failure: what a synchronous call would have answered.",
                },
                "query_result_id": {"type": ["string", "null"]},
                "created_at": {"type": "string"},
                "updated_at": {"type": "string"},
            },
        }
    },
}

_QUERY_RESULT = {
    "type": "object",
    "required": ["query_result"],
    "properties": {
        "query_result": {
            "type": "object",
            "required": ["id", "endpoint", "version", "retrieved_at", "runtime_ms", "data"],
            "properties": {
                "id": {"type": "string"},
                "endpoint": {"type": ["string", "null"]},
                "version": {"type": ["integer", "null"]},
                "retrieved_at": {"type": "number"},
                "runtime_ms": {"type": ["number", "null"]},
                "data": {"description": "The script's or function's result."},
            },
        }
    },
}

_PAGING = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
    for name in ("page_number", "page_size", "filter", "sort")
]

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

_CALL_HEADERS = [
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "respond-async (RFC 7240): answer 202 with a job at once.",
    },
    {
        "name": "Cache-Control",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "max-age=N: as the body's max_age.",
    },
]

_INFO = {
    "type": "object",
    "required": [
        "description",
        "creation_time",
        "state_path",
        "server_version",
        "name",
        "versions",
    ],
    "properties": {
        "description": {"type": "string"},
        "creation_time": {"type": "string"},
        "state_path": {"type": "string"},
        "server_version": {"type": "string"},
        "name": {"type": "string"},
        "versions": {
            "type": "object",
            "properties": {
                "v1": {
                    "type": "object",
                    "properties": {
                        "features": {
                            "type": "object",
                            "required": ["evaluate_enabled", "gzip_enabled", "arrow_enabled"],
                            "properties": {
                                "evaluate_enabled": {"type": "boolean"},
                                "gzip_enabled": {"type": "boolean"},
                                "arrow_enabled": {"type": "boolean"},
                                "authentication": {"type": "object"},
                            },
                        }
                    },
                }
            },
        },
    },
}

_READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "checks": {"type": "array", "items": {"type": "object"}},
    },
}

_EVALUATE_BODY = {
    "type": "object",
    "required": ["script", "data"],
    "properties": {
        "script": {"type": "string", "description": "The body of a Python function."},
        "data": {
            "type": "object",
            "description": "_arg1 … _argN, numbered from 1 without gaps; {} is allowed.",
            "propertyNames": {"pattern": "^_arg[1-9][0-9]*$"},
        },
        "max_age": _MAX_AGE,
        "dataPath": {
            "type": "string",
            "description": "Only with TABPY_ARROW_ENABLE: the Arrow Flight path of the table "
            'that becomes _arg1 (data is then ignored); the answer is {"outputDataPath": ...}.',
        },
    },
}

_DEPLOY_BODY = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "type": {"type": "string", "enum": ["model", "alias"]},
        "description": {"type": "string"},
        "archive": {"type": "string", "description": "base64 of the cloudpickled function"},
        "src_path": {"type": "string", "description": "TabPy's client: a staged directory"},
        "target": {"type": "string", "description": "alias: the endpoint it names"},
        "docstring": {"type": "string"},
        "schema": {},
        "is_public": {"type": "boolean"},
        "should_update_version": {"type": "boolean"},
        "max_age": {**_MAX_AGE, "description": "The default max_age of calls to it."},
    },
}

_KEY_ID = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[^/]+$"},
    "example": "0123456789abcdef",
}

_API_KEY = {
    "type": "object",
    "description": "An API key, without its secret (the key itself is shown once).",
    "required": ["id", "kind", "user", "endpoint", "created", "expires", "revoked", "last_used"],
    "properties": {
        "id": {"type": "string"},
        "kind": {"type": "string", "enum": ["user", "endpoint"]},
        "user": {"type": ["string", "null"], "description": "A user key's user"},
        "endpoint": {"type": ["string", "null"], "description": "An endpoint key's endpoint"},
        "created": {"type": "number"},
        "expires": {"type": ["number", "null"]},
        "revoked": {"type": ["number", "null"]},
        "last_used": {"type": ["number", "null"], "description": "to within a minute"},
        "secret": {"type": "string", "description": "Only in the creation's answer"},
    },
}

_KEY_REQUEST = {
    "type": "object",
    "description": "Exactly one of user and endpoint.",
    "properties": {"user": {"type": "string"}, "endpoint": {"type": "string"}},
    "additionalProperties": False,
}

_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[^/]+$"},
    "example": "add",
}


# The list routes' paging parameters (``server.paging``).
_PAGING = [
    {
        "name": "page_number",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "1-based page number",
    },
    {
        "name": "page_size",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        "description": "items per page (100 unless given)",
    },
    {
        "name": "filter",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "field:operator:value clauses joined by ',' (eq, ne, gt, gte, lt, lte, "
        "in with values joined by '|', has); a backslash makes the next character literal",
        "example": "type:eq:model",
    },
    {
        "name": "sort",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "field:asc or field:desc clauses joined by ','",
        "example": "last_modified_time:desc",
    },
]
_PAGINATION = {
    "type": "object",
    "required": ["page_number", "page_size", "total_available"],
    "properties": {
        "page_number": {"type": "integer"},
        "page_size": {"type": "integer"},
        "total_available": {"type": "integer"},
    },
}
_USER = {
    "type": "object",
    "required": ["name", "permissions"],
    "properties": {
        "name": {"type": "string"},
        "permissions": {"type": "string", "description": "e.g. evaluate,query,manage"},
    },
}
_USER_BODY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "password": {"type": "string"},
        "permissions": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
        },
    },
}


def _page_of(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["pagination", key],
        "properties": {"pagination": _PAGINATION, key: {"type": "array", "items": item}},
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


# The only 500s tabserve gives: user code failed (a script, or a deployed function), or the
# worker running it died. Anything else would be a bug, and the fuzzing test catches it.
_SCRIPT_ERROR = {
    "allOf": [
        {"$ref": "#/components/schemas/Error"},
        {
            "properties": {
                "message": {
                    "anyOf": [
                        {"const": "Error processing script"},
                        {"pattern": "^Error querying function '.*'$"},
                    ]
                }
            }
        },
    ]
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _ERRORS[str(code)],
            "content": {
                JSON: {
                    "schema": _SCRIPT_ERROR
                    if code == 500
                    else {"$ref": "#/components/schemas/Error"}
                }
            },
        }
        for code in codes
    }


# Every authenticated operation's ways in ({}: none, when authentication is off).
_SECURITY: list[dict[str, list[str]]] = [{}, {"basic": []}, {"bearer": []}, {"key": []}]


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    # Tableau 2020.1 labels its JSON as a form; the body is JSON whatever the type says.
    return {
        "required": True,
        "description": description,
        "content": {JSON: {"schema": schema}},
    }


def _operation(
    summary: str, ok: dict[str, dict[str, Any]], errors: tuple[int, ...], **extra: Any
) -> dict[str, Any]:
    # 400: credentials sent twice (a Key header and ?api_key=); 403: an endpoint key.
    auth = (400, 401, 403, 406)
    common = (405, 413)
    codes = tuple(sorted(set(errors + auth + common)))
    return {"summary": summary, "responses": {**ok, **_errors(*codes)}, **extra}


def document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``routes.ROUTES``), ready for ``json.dumps``.

    Its paths are the routes' paths, and each path's operations the verbs its handler
    implements; a public route's operations need no credentials.
    """
    operations = _operations()
    if set(operations) != {route.path for route in routes}:
        raise ValueError(f"described paths {sorted(operations)} are not the routed ones")
    paths: dict[str, Any] = {}
    for route in routes:
        path = operations[route.path]
        described = {verb for verb in path if verb in VERBS}
        if described != set(route.methods):
            raise ValueError(f"{route.path}: {sorted(described)} described, {route.methods} served")
        for verb in described:
            # A verb the route table guards with a permission (a token's scope included)
            # can be refused with 403; its description must say so.
            guarded = verb.upper() in route.permissions or verb.upper() in route.token_permissions
            if guarded and "403" not in path[verb]["responses"]:
                raise ValueError(f"{route.path}: {verb} needs a permission but lists no 403")
        if route.public is True:
            for verb in described:
                operation = path[verb]
                path[verb] = {"summary": operation["summary"], "security": [{}], **operation}
        for verb in described & {v.lower() for v in route.key_in_url}:
            # The only operations that take a key in the query string (download links).
            path[verb] = {**path[verb], "security": [*_SECURITY, {"api_key": []}]}
        paths[route.path] = path
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tabserve",
            "version": __version__,
            "description": "Tableau Analytics Extensions API v1 and TabPy's REST API. "
            "Errors always have the {message, info} envelope.",
        },
        "components": {
            "schemas": {
                "Error": _ENVELOPE,
                "Endpoint": _ENDPOINT,
                "Info": _INFO,
                "ApiKey": _API_KEY,
            },
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "key": {
                    "type": "http",
                    "scheme": "key",
                    "description": "An API key: Authorization: Key tsk_...",
                },
                "api_key": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "api_key",
                    "description": "An API key in the URL: result downloads only.",
                },
            },
        },
        "security": _SECURITY,
        "paths": paths,
    }


def _operations() -> dict[str, dict[str, Any]]:
    """What each path's operations answer, by path and verb (and path-level fields)."""
    run_errors = (400, 403, 404, 408, 415, 500, 503)
    endpoint_ref = {"$ref": "#/components/schemas/Endpoint"}
    endpoints_map = {"type": "object", "additionalProperties": endpoint_ref}
    query_answer = {
        "type": "object",
        "required": ["response", "version", "model", "uuid"],
        "properties": {
            "response": {},
            "version": {"type": "integer"},
            "model": {"type": "string"},
            "uuid": {"type": "string"},
        },
    }
    key_ref = {"$ref": "#/components/schemas/ApiKey"}
    keys_list = {"type": "object", "required": ["keys"], "properties": {
        "keys": {"type": "array", "items": key_ref}}}  # fmt: skip
    one_key = {"type": "object", "required": ["key"], "properties": {"key": key_ref}}
    accepted = {"202": _json(_JOB, "With Prefer: respond-async: the job (Location: /jobs/<id>)")}
    query = _operation(
        "Call a deployed endpoint (MODEL_EXTENSION_*)",
        {
            "200": _json(query_answer, "The function's result and which version answered."),
            **accepted,
        },
        run_errors,
        parameters=[_NAME, *_CALL_HEADERS],
    )
    query_body = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": ["object", "array"]}, "max_age": _MAX_AGE},
    }
    result_file = {
        "get": _operation(
            "A job's result as a file to download (Content-Disposition: attachment)",
            {
                "200": {
                    "description": "JSON: the data; CSV: a list is one column, a table its "
                    "columns, a scalar one cell",
                    "content": {JSON: {}, "text/csv": {}},
                }
            },
            (404,),
            parameters=[_ID],
        )
    }
    return {
        "/": {
            "get": {
                "summary": "The status page (public)",
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {}}},
                    **_errors(405, 413),
                },
            }
        },
        "/assets/{name}": {
            "get": {
                "summary": "The status page's script and style sheet (public)",
                "parameters": [_NAME],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {"text/javascript": {}, "text/css": {}},
                    },
                    **_errors(404, 405, 413),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (public)",
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1"),
                    **_errors(405, 413),
                },
            }
        },
        "/health/live": {
            "get": {
                "summary": "Liveness probe (no credentials)",
                "responses": {
                    "200": _json({"type": "object", "required": ["status"]}, "The process is up"),
                    **_errors(405, 413),
                },
            }
        },
        "/health/ready": {
            "get": {
                "summary": "Readiness probe (no credentials): named checks",
                "responses": {
                    "200": _json(_READY, "Every check passed"),
                    "503": _json(_READY, "A check failed; the body says which"),
                    **_errors(405, 413),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format (credentials unless TABSERVE_METRICS_AUTH "
                "is false)",
                "responses": {
                    "200": {"description": "Prometheus text", "content": {"text/plain": {}}},
                    **_errors(400, 401, 403, 405, 406, 413),
                },
            }
        },
        "/info": {
            "get": _operation(
                "Test Connection: static facts about the server",
                {"200": _json({"$ref": "#/components/schemas/Info"}, "Server facts")},
                (),
            )
        },
        "/evaluate": {
            "post": _operation(
                "Run a script (SCRIPT_* calculations, Table Extensions)",
                {
                    "200": {"description": _ANY_JSON["description"], "content": {JSON: {}}},
                    **accepted,
                },
                run_errors,
                parameters=_CALL_HEADERS,
                requestBody=_body(_EVALUATE_BODY, "JSON, optionally gzip-encoded"),
            )
        },
        "/status": {
            "get": _operation(
                "Load status of every deployed endpoint",
                {
                    "200": _json(
                        {"type": "object", "additionalProperties": {"type": "object"}},
                        "By endpoint name: version, type, status, last_error",
                    )
                },
                (),
            )
        },
        "/endpoints": {
            "get": _operation(
                "Every deployed endpoint; with paging parameters, one page of them",
                {
                    "200": _json(
                        {"anyOf": [endpoints_map, _page_of("endpoints", endpoint_ref)]},
                        "By name (TabPy's answer), or with paging parameters a page: "
                        "{pagination, endpoints: [...]}, each with its name",
                    )
                },
                (400,),
                parameters=_PAGING,
            ),
            "post": _operation(
                "Deploy an endpoint (version 1)",
                {"201": _json(endpoints_map, "The new endpoint, by name")},
                (400, 403, 500, 503, 408, 507),
                requestBody=_body(_DEPLOY_BODY, "The endpoint"),
            ),
        },
        "/endpoints/{name}": {
            "parameters": [_NAME],
            "get": _operation("One endpoint", {"200": _json(endpoint_ref, "It")}, (404,)),
            "put": _operation(
                "Update an endpoint (a new version with should_update_version)",
                {"200": _json(endpoints_map, "The endpoint, by name")},
                (400, 403, 404, 408, 500, 503, 507),
                requestBody=_body(_DEPLOY_BODY, "The changes"),
            ),
            "delete": _operation(
                "Remove an endpoint",
                {"204": {"description": "Removed"}},
                (400, 403, 404, 503, 507),
            ),
        },
        "/query/{name}": {
            "post": {**query, "requestBody": _body(query_body, "Named or positional args")},
            "get": {**query, "summary": "As POST, for TabPy's clients"},
        },
        "/jobs": {
            "get": _operation(
                "The newest jobs the caller may see (a manager: everyone's), newest first",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["jobs", "pagination"],
                            "properties": {
                                "jobs": {"type": "array", "items": _JOB["properties"]["job"]},
                                "pagination": {"type": "object"},
                            },
                        },
                        "A page of jobs (page_number, page_size, filter, sort)",
                    )
                },
                (400,),
                parameters=_PAGING,
            )
        },
        "/jobs/{id}": {
            "parameters": [_ID],
            "get": _operation(
                "An asynchronous job's status (404 for another caller's)",
                {"200": _json(_JOB, "The job")},
                (404,),
            ),
            "delete": _operation(
                "Cancel a job: a pending one never starts, a running one's worker is killed",
                {"200": _json(_JOB, "The job after cancelling (a finished one is unchanged)")},
                (404,),
            ),
        },
        "/query_results/{id}.json": result_file,
        "/query_results/{id}.csv": result_file,
        "/query_results/{id}": {
            "get": _operation(
                "A job's result (404 once expired: TABSERVE_RESULT_TTL)",
                {"200": _json(_QUERY_RESULT, "The result")},
                (404,),
                parameters=[_ID],
            )
        },
        "/configurations/endpoint_upload_destination": {
            "get": _operation(
                "Where TabPy's client stages pickles",
                {"200": _json({"type": "object", "required": ["path"]}, "The directory")},
                (403,),  # a bearer token without the deploy scope
            )
        },
        # 404 throughout when the users are not in the store (TABSERVE_USERS = file).
        "/users": {
            "get": _operation(
                "The store's users (manage), one page at a time",
                {"200": _json(_page_of("users", _USER), "{pagination, users: [...]}")},
                (400, 403, 404, 503),
                parameters=_PAGING,
            ),
            "post": _operation(
                "Add a user to the store (manage)",
                {"201": _json({"type": "object", "required": ["user"]}, "The new user")},
                (400, 403, 404, 503, 507),
                requestBody=_body(_USER_BODY, "name, password, permissions (all if absent)"),
            ),
        },
        "/users/{name}": {
            "parameters": [_NAME],
            "get": _operation(
                "One user (manage)", {"200": _json({"type": "object"}, "{user}")}, (403, 404)
            ),
            "put": _operation(
                "Change a user's password or permissions (manage)",
                {"200": _json({"type": "object", "required": ["user"]}, "{user}")},
                (400, 403, 404, 503, 507),
                requestBody=_body(_USER_BODY, "password and/or permissions"),
            ),
            "delete": _operation(
                "Remove a user (manage)", {"204": {"description": "Removed"}}, (403, 404, 503, 507)
            ),
        },
        "/keys": {
            "get": _operation(
                "Every API key, revoked ones too, without secrets; with paging parameters, "
                "one page of them and the pagination",
                {"200": _json(keys_list, "The keys")},
                (400, 403, 404, 503),
                parameters=_PAGING,
            ),
            "post": _operation(
                "Create an API key; the answer holds the key, shown this once",
                {"201": _json(one_key, "The key, with its secret")},
                (400, 403, 404, 503),
                requestBody=_body(_KEY_REQUEST, "Whose key: a user's, or one endpoint's"),
            ),
        },
        "/keys/{key_id}": {
            "parameters": [_KEY_ID],
            "get": _operation("One API key", {"200": _json(one_key, "It")}, (403, 404, 503)),
            "delete": _operation(
                "Revoke an API key (refused everywhere within a second)",
                {"200": _json(one_key, "The key, revoked")},
                (403, 404, 503),
            ),
        },
    }
