"""The values a store holds, the same for every backend: endpoints, users, a snapshot.

An endpoint's metadata is also written as TabPy's state.ini line (a JSON object per name,
plus the docstring in its own section); :func:`endpoint_document` and
:func:`endpoint_from_document` are that mapping, used by the state directory and, as the
``document`` column, by the SQL backends, so an import or export is a plain copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Fields stored in the JSON line of [Query Objects Service Versions], in TabPy's order.
STORED = (
    "description",
    "type",
    "version",
    "dependencies",
    "target",
    "creation_time",
    "last_modified_time",
    "schema",
    "is_public",
)
# Recorded by tabserve's client at deploy time (absent for TabPy deploys).
FINGERPRINT = ("python_version", "cloudpickle_version", "signature")
# Deploy options of tabserve's own (absent unless given): the default max_age of calls.
OPTIONS = ("max_age",)


@dataclass(frozen=True)
class EndpointRecord:
    """One deployed endpoint's metadata (not its code)."""

    name: str
    type: str
    version: int = 1
    description: str = ""
    docstring: str = ""
    dependencies: list[str] = field(default_factory=list)
    target: str | None = None
    creation_time: int = 0
    last_modified_time: int = 0
    schema: Any = None
    is_public: Any = False
    python_version: str | None = None
    cloudpickle_version: str | None = None
    signature: str | None = None
    max_age: int | None = None  # a call giving no max_age accepts a cached result this old

    def info(self) -> dict[str, Any]:
        """TabPy's endpoint description: stored fields in order, then docstring, then extras."""
        data = {key: getattr(self, key) for key in STORED}
        data["docstring"] = self.docstring
        extras = (*FINGERPRINT, *OPTIONS)
        data.update({k: getattr(self, k) for k in extras if getattr(self, k) is not None})
        return data


def endpoint_document(endpoint: EndpointRecord) -> dict[str, Any]:
    """The JSON object state.ini holds for ``endpoint`` (without its docstring)."""
    stored = asdict(endpoint)
    line = {key: stored[key] for key in STORED}
    line.update({k: stored[k] for k in (*FINGERPRINT, *OPTIONS) if stored[k] is not None})
    return line


def endpoint_from_document(name: str, data: dict[str, Any], docstring: str) -> EndpointRecord:
    """Rebuild an endpoint from its JSON object; raises ValueError or TypeError if it is bad."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    known = {k: data[k] for k in (*STORED, *FINGERPRINT, *OPTIONS) if k in data}
    known["docstring"] = docstring
    known.setdefault("type", "model")
    known["dependencies"] = list(known.get("dependencies") or [])
    known["version"] = int(known.get("version") or 1)
    return EndpointRecord(name=name, **known)


def dump_document(endpoint: EndpointRecord) -> str:
    """The ``document`` column of the SQL backends: state.ini's line plus the docstring."""
    return json.dumps(
        {**endpoint_document(endpoint), "docstring": endpoint.docstring}, ensure_ascii=False
    )


def load_document(name: str, text: str) -> EndpointRecord:
    data = json.loads(text)
    docstring = data.pop("docstring", "") if isinstance(data, dict) else ""
    return endpoint_from_document(name, data, docstring if isinstance(docstring, str) else "")


@dataclass(frozen=True)
class UserRecord:
    """A user as a store holds it: the password file's hash token and permissions."""

    name: str
    password_hash: str
    permissions: frozenset[str] | None = None  # None: every permission (TabPy's users)


@dataclass(frozen=True)
class Snapshot:
    """Everything a replica serves from, read in one go."""

    generation: int
    endpoints: dict[str, EndpointRecord]
    service: dict[str, str] = field(default_factory=dict)  # [Service Info] keys and values


class EndpointChange:
    """What one write transaction does to the endpoint table.

    A store hands it out holding the table as it is now, read under the store's write lock,
    so whatever the caller decides from ``endpoints`` (the next version number, whether a
    name is free) cannot be overtaken by another writer: the store commits the change before
    it lets the next writer read.
    """

    def __init__(self, endpoints: dict[str, EndpointRecord]) -> None:
        self.before = dict(endpoints)
        self.endpoints = dict(endpoints)
        self.archives: dict[tuple[str, int], bytes] = {}
        self.deleted: set[str] = set()

    def put(self, endpoint: EndpointRecord, archive: bytes | None = None) -> None:
        """Record ``endpoint``; ``archive`` is its version's pickle_archive when it is new."""
        self.endpoints[endpoint.name] = endpoint
        self.deleted.discard(endpoint.name)
        if archive is not None:
            self.archives[(endpoint.name, endpoint.version)] = archive

    def keep_archive(self, name: str, version: int, data: bytes) -> None:
        """Also store an older version's archive (a copy keeps the rollback target)."""
        self.archives[(name, version)] = data

    def delete(self, name: str) -> None:
        self.endpoints.pop(name, None)
        self.archives = {key: v for key, v in self.archives.items() if key[0] != name}
        self.deleted.add(name)

    @property
    def changed(self) -> list[str]:
        """Names whose row changes (put with a different value, or new)."""
        return [n for n, e in self.endpoints.items() if self.before.get(n) != e]


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as the store holds it: never the key itself, only its hash.

    A **user key** (``endpoint`` None) acts as ``user_name`` with that user's permissions
    as they are when it is used. An **endpoint key** (``endpoint`` set) may only call that
    endpoint; its ``user_name`` is empty, since it acts as no user.
    """

    id: str
    secret_hash: str
    user_name: str
    endpoint: str | None
    created: float
    expires: float | None = None
    revoked: float | None = None
    last_used: float | None = None

    @property
    def kind(self) -> str:
        return "user" if self.endpoint is None else "endpoint"

    def usable(self, now: float) -> bool:
        return self.revoked is None and (self.expires is None or now < self.expires)

    def public(self) -> dict[str, Any]:
        """What lists and answers show: everything but the hash."""
        return {
            "id": self.id,
            "kind": self.kind,
            "user": self.user_name if self.endpoint is None else None,
            "endpoint": self.endpoint,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "last_used": self.last_used,
        }


# -- jobs and results (issue 12) ---------------------------------------------------------------

# Redash's status codes, as GET /jobs/<id> reports them.
PENDING, STARTED, SUCCESS, FAILURE, CANCELLED = 1, 2, 3, 4, 5
FINISHED = frozenset({SUCCESS, FAILURE, CANCELLED})


@dataclass(frozen=True)
class JobRecord:
    """One asynchronous call: what to run, who asked, and how it went.

    ``kind`` is ``query`` (``endpoint`` names it), ``evaluate``, or ``evaluate-noquery``
    (a script whose caller may not use ``tabpy.query()``: the refusal is decided when the
    job is submitted, not when it runs). ``error`` is the ``{"message", "info"}`` envelope a
    synchronous call would have answered, as JSON text.
    """

    id: str
    kind: str
    endpoint: str | None
    owner: str
    status: int
    request: bytes
    encoding: str
    created: float
    started: float | None = None
    finished: float | None = None
    claimed_by: str | None = None
    heartbeat: float | None = None
    error: str | None = None
    result_key: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    """A job's answer: the JSON bytes a synchronous call would have written."""

    id: str
    endpoint: str | None
    version: int | None
    body: bytes
    retrieved_at: float
    runtime_ms: float | None = None
    owner: str | None = None  # the owner of the job that produced it

    @property
    def size(self) -> int:
        return len(self.body)
