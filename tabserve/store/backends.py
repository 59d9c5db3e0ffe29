"""The store's interface and how to open one: the state directory, or PostgreSQL.

``TABSERVE_STORE`` unset: :class:`~.state_dir.StateDirStore`, TabPy's state directory plus an
SQLite database beside it. ``postgresql://user:password@host:port/dbname``:
:class:`~.postgres.PostgresStore`, everything in PostgreSQL, shared by replicas.

Every method blocks (file or database I/O): call them from a thread, never on the event
loop. ``token()`` is the exception: it reads nothing and is cheap enough for every request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Protocol

from .database import StoreError, StoreUnavailable, redact
from .jobs import JobLimits
from .records import (
    ApiKeyRecord,
    EndpointChange,
    EndpointRecord,
    JobRecord,
    ResultRecord,
    Snapshot,
    UserRecord,
)

__all__ = [
    "ApiKeyRecord",
    "EndpointChange",
    "EndpointRecord",
    "JobRecord",
    "ResultRecord",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UserRecord",
    "open_store",
]


class Store(Protocol):
    @property
    def shown(self) -> str: ...
    def migrate(self) -> list[int]: ...
    def token(self) -> Hashable: ...
    def watch(self, on_change: Callable[[], None]) -> None: ...
    def health(self) -> tuple[bool, str]: ...
    def snapshot(self) -> Snapshot: ...
    def change(self) -> contextlib.AbstractContextManager[EndpointChange]: ...
    def archive(self, name: str, version: int) -> bytes | None: ...
    def archive_path(self, endpoint: EndpointRecord) -> Path: ...
    def materialize(self, endpoints: dict[str, EndpointRecord]) -> list[str]: ...
    def prune_cache(self, endpoints: dict[str, EndpointRecord]) -> None: ...
    def put_service(self, values: dict[str, str], *, only_missing: bool = False) -> None: ...
    def users(self) -> dict[str, UserRecord]: ...
    def put_user(self, user: UserRecord, *, create: bool | None = None) -> None: ...
    def delete_user(self, name: str) -> None: ...
    def api_keys(self) -> list[ApiKeyRecord]: ...
    def api_key(self, key_id: str) -> ApiKeyRecord | None: ...
    def add_api_key(self, key: ApiKeyRecord) -> None: ...
    def revoke_api_key(self, key_id: str, when: float) -> ApiKeyRecord: ...
    def touch_api_key(self, key_id: str, when: float) -> None: ...
    # Jobs and their results (store/jobs.py, the same SQL for both backends).
    def put_job(self, job: JobRecord, limits: JobLimits | None = None) -> None: ...
    def job(self, job_id: str) -> JobRecord | None: ...
    def claim_job(self, replica: str) -> JobRecord | None: ...
    def heartbeat_jobs(self, ids: Iterable[str]) -> dict[str, int]: ...
    def finish_job(
        self, job_id: str, status: int, error: str | None, result: ResultRecord | None
    ) -> int: ...
    def cancel_job(self, job_id: str) -> JobRecord | None: ...
    def fail_orphaned_jobs(
        self, orphaned: Callable[[str | None, float | None], bool], message: str
    ) -> list[str]: ...
    def recent_jobs(self, owner: str | None, limit: int) -> list[JobRecord]: ...
    def result(self, result_id: str) -> ResultRecord | None: ...
    def prune_results(self, older_than: float, max_bytes: int) -> int: ...
    def close(self) -> None: ...


def is_store_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, cache: Path | None = None) -> Store:
    """The store at ``location``: a ``postgresql://`` URL or a state directory path.

    ``cache`` is where a PostgreSQL store writes archives for the workers (a replica's own
    directory). Nothing is read or migrated yet.
    """
    text = str(location)
    if is_store_url(text):
        from .postgres import PostgresStore

        if cache is None:
            raise StoreError("a PostgreSQL store needs a local cache directory for archives")
        return PostgresStore(text, cache)
    if "://" in text:
        raise StoreError(
            f"TABSERVE_STORE: unsupported store {redact(text)!r}; expected a "
            "postgresql://user:password@host:port/dbname URL, or unset for the state directory"
        )
    from .state_dir import StateDirStore

    return StateDirStore(Path(text))
