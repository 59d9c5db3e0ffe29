"""The typed items ``tabserve.Server``'s resources return, as Tableau Server Client's do:
frozen dataclasses built from the server's JSON, whatever fields a newer server adds kept in
``extra`` rather than dropped.

Times are aware UTC datetimes (the server sends epoch seconds or ISO 8601).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, IntEnum
from typing import Any

from .transport import as_bool, as_time


def _extra(info: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in known}


@dataclass(frozen=True)
class PaginationItem:
    """Where a page is in its list: ``total_available`` counts every match, on all pages."""

    page_number: int
    page_size: int
    total_available: int

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> PaginationItem:
        return cls(int(info["page_number"]), int(info["page_size"]), int(info["total_available"]))


class PublishMode(str, Enum):
    """What ``endpoints.publish`` does when the name is taken, as TSC's publish modes."""

    CreateNew = "CreateNew"
    Overwrite = "Overwrite"


@dataclass(frozen=True)
class EndpointItem:
    """A deployed endpoint (a model or an alias)."""

    name: str
    type: str = "model"
    version: int = 1
    description: str = ""
    docstring: str = ""
    target: str | None = None
    dependencies: tuple[str, ...] = ()
    schema: Any = None
    is_public: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    python_version: str | None = None
    cloudpickle_version: str | None = None
    signature: str | None = None
    max_age: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    _KNOWN = {
        "name", "type", "version", "description", "docstring", "target", "dependencies",
        "schema", "is_public", "creation_time", "last_modified_time", "python_version",
        "cloudpickle_version", "signature", "max_age",
    }  # fmt: skip

    @classmethod
    def from_json(cls, name: str, info: Mapping[str, Any]) -> EndpointItem:
        max_age = info.get("max_age")
        return cls(
            name=name,
            type=str(info.get("type", "model")),
            version=int(info.get("version", 1)),
            description=info.get("description") or "",
            docstring=info.get("docstring") or "",
            target=info.get("target"),
            dependencies=tuple(info.get("dependencies") or ()),
            schema=info.get("schema"),
            is_public=as_bool(info.get("is_public", False)),
            created_at=as_time(info.get("creation_time")),
            updated_at=as_time(info.get("last_modified_time")),
            python_version=info.get("python_version"),
            cloudpickle_version=info.get("cloudpickle_version"),
            signature=info.get("signature"),
            max_age=None if max_age is None else int(max_age),
            extra=_extra(info, cls._KNOWN),
        )


@dataclass(frozen=True)
class UserItem:
    """A user kept in the store; ``permissions`` None means every one."""

    name: str
    permissions: frozenset[str] | None = None

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> UserItem:
        raw = info.get("permissions")
        names = [p for p in raw.split(",") if p] if isinstance(raw, str) else list(raw or [])
        return cls(name=str(info["name"]), permissions=frozenset(names))


@dataclass(frozen=True)
class ServerInfoItem:
    """``GET /info``: what the server is and which features it has on."""

    server_version: str
    name: str
    description: str
    features: dict[str, Any]
    state_path: str | None = None
    created_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def evaluate_enabled(self) -> bool:
        return bool(self.features.get("evaluate_enabled", True))

    @property
    def authentication_required(self) -> bool:
        return bool(self.features.get("authentication", {}).get("required", False))

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> ServerInfoItem:
        features = info.get("versions", {}).get("v1", {}).get("features", {})
        known = {"server_version", "name", "description", "versions", "state_path",
                 "creation_time"}  # fmt: skip
        return cls(
            server_version=str(info.get("server_version", "")),
            name=str(info.get("name", "")),
            description=str(info.get("description", "")),
            features=dict(features),
            state_path=info.get("state_path"),
            created_at=as_time(info.get("creation_time")),
            extra=_extra(info, known),
        )


class JobStatus(IntEnum):
    """A job's status, numbered as Redash numbers them (and as ``GET /jobs/<id>`` sends)."""

    PENDING = 1
    STARTED = 2
    SUCCESS = 3
    FAILURE = 4
    CANCELLED = 5

    @property
    def finished(self) -> bool:
        return self >= JobStatus.SUCCESS


@dataclass(frozen=True)
class JobItem:
    """An asynchronous call (``endpoints.submit``); ``query_result_id`` once it succeeded."""

    id: str
    status: JobStatus
    error: str | None = None  # on FAILURE: the message a synchronous call would have given
    error_info: Any = None  # and its info
    query_result_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> JobItem:
        job = info.get("job", info)
        known = {"id", "status", "error", "query_result_id", "created_at", "updated_at"}
        result = job.get("query_result_id")
        error, info = job.get("error"), None
        if isinstance(error, Mapping):  # the {"message", "info"} envelope
            error, info = error.get("message"), error.get("info")
        return cls(
            id=str(job["id"]),
            status=JobStatus(int(job["status"])),
            error=None if error is None else str(error),
            error_info=info,
            query_result_id=None if result is None else str(result),
            created_at=as_time(job.get("created_at")),
            updated_at=as_time(job.get("updated_at")),
            extra=_extra(job, known),
        )


@dataclass(frozen=True)
class ResultItem:
    """A stored result (``GET /query_results/<id>``), with its data decoded."""

    id: str
    endpoint: str | None
    version: int | None
    retrieved_at: datetime | None
    runtime_ms: float | None
    data: Any
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> ResultItem:
        result = info.get("query_result", info)
        known = {"id", "endpoint", "version", "retrieved_at", "runtime_ms", "data"}
        version = result.get("version")
        runtime = result.get("runtime_ms")
        return cls(
            id=str(result["id"]),
            endpoint=result.get("endpoint"),
            version=None if version is None else int(version),
            retrieved_at=as_time(result.get("retrieved_at")),
            runtime_ms=None if runtime is None else float(runtime),
            data=result.get("data"),
            extra=_extra(result, known),
        )


@dataclass(frozen=True)
class KeyItem:
    """An API key's record: never its secret, which ``keys.create`` returns once."""

    id: str
    user: str | None = None
    endpoint: str | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        """``"user"`` (acts as its user) or ``"endpoint"`` (one endpoint's queries only)."""
        return "endpoint" if self.endpoint is not None else "user"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> KeyItem:
        key = info["key"] if isinstance(info.get("key"), Mapping) else info
        known = {
            "id", "kind", "user", "endpoint", "created", "created_at", "last_used",
            "last_used_at", "expires", "expires_at", "revoked", "revoked_at", "secret",
        }  # fmt: skip

        def time_of(*names: str) -> datetime | None:
            for name in names:
                if key.get(name) not in (None, False):
                    return as_time(key[name])
            return None

        return cls(
            id=str(key["id"]),
            user=key.get("user"),
            endpoint=key.get("endpoint"),
            created_at=time_of("created_at", "created"),
            last_used_at=time_of("last_used_at", "last_used"),
            expires_at=time_of("expires_at", "expires"),
            revoked_at=time_of("revoked_at", "revoked"),
            extra=_extra(key, known),
        )
