"""The SQL store: endpoints, their archives, users and service info in one database.

This is the PostgreSQL backend (``TABSERVE_STORE = postgresql://...``): replicas share the
database and nothing else. The same code runs on SQLite, which the tests use as a second
dialect of the one schema.

Every change runs in :meth:`Database.write` (an exclusive transaction), bumps the
``generation`` row and, in PostgreSQL, sends ``NOTIFY tabserve_changes, '<generation>'``; the
notification is delivered at commit, so a replica that hears it reads the committed rows.

Archives live in the ``archives`` table; a replica writes each version it serves once into
its local cache directory (``<cache>/<name>/<version>/pickle_archive``, the state
directory's layout), because workers load archives from files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .archives import ARCHIVE_FILE
from .database import CHANGES_CHANNEL, Database, Tx
from .files import atomic_write
from .jobs import JobTables
from .records import (
    ApiKeyRecord,
    EndpointChange,
    EndpointRecord,
    Snapshot,
    UserRecord,
    dump_document,
    load_document,
)

log = logging.getLogger("tabserve.store")


class SqlStore(JobTables):
    """Endpoints, archives, users and service info in a SQL database; jobs and results
    (``JobTables``)."""

    def __init__(self, database: Database, cache: Path) -> None:
        self.db = database
        self.cache = cache  # local copies of archives, for the workers

    @property
    def shown(self) -> str:
        return self.db.shown

    def _database(self) -> Database:
        return self.db

    def migrate(self) -> list[int]:
        return self.db.migrate()

    # -- reading ---------------------------------------------------------------------------

    def generation(self) -> int:
        with self.db.read() as tx:
            return _generation(tx)

    def snapshot(self) -> Snapshot:
        with self.db.read() as tx:
            return Snapshot(_generation(tx), _endpoints(tx), _service(tx))

    def archive(self, name: str, version: int) -> bytes | None:
        with self.db.read() as tx:
            rows = tx.execute(
                "SELECT data FROM archives WHERE name = ? AND version = ?", (name, version)
            )
        return bytes(rows[0][0]) if rows else None

    def archive_path(self, endpoint: EndpointRecord) -> Path:
        """Where workers read ``endpoint``'s archive (see :meth:`materialize`)."""
        return self.cache / endpoint.name / str(endpoint.version) / ARCHIVE_FILE

    def materialize(self, endpoints: dict[str, EndpointRecord]) -> list[str]:
        """Write the archive of every model in ``endpoints`` that the cache lacks.

        Versions never change once written, so a file present is a file up to date. Returns
        the names whose archive is missing from the store (they cannot be served).
        """
        missing = []
        for endpoint in endpoints.values():
            if endpoint.type != "model":
                continue
            path = self.archive_path(endpoint)
            if path.is_file():
                continue
            data = self.archive(endpoint.name, endpoint.version)
            if data is None:
                missing.append(endpoint.name)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return missing

    def prune_cache(self, endpoints: dict[str, EndpointRecord]) -> None:
        """Drop cached versions that are neither current nor the one before."""
        if not self.cache.is_dir():
            return
        for directory in self.cache.iterdir():
            if directory.name.startswith("."):
                continue
            current = endpoints.get(directory.name)
            keep = set() if current is None else {str(current.version), str(current.version - 1)}
            for child in directory.iterdir() if directory.is_dir() else ():
                if child.name not in keep:
                    _remove_tree(child)
            if current is None:
                _remove_tree(directory)

    # -- changing endpoints ----------------------------------------------------------------

    @contextlib.contextmanager
    def change(self) -> Iterator[EndpointChange]:
        """An exclusive change of the endpoint table, committed when the block ends."""
        with self.db.write() as tx:
            change = EndpointChange(_endpoints(tx))
            yield change
            generation = _bump(tx)
            for name in change.deleted:
                if name in change.before:
                    tx.execute("DELETE FROM archives WHERE name = ?", (name,))
                    tx.execute("DELETE FROM endpoints WHERE name = ?", (name,))
            for (name, version), data in change.archives.items():
                tx.execute(
                    "INSERT INTO archives (name, version, data, sha256, created) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, version) DO UPDATE SET "
                    "data = excluded.data, sha256 = excluded.sha256, created = excluded.created",
                    (name, version, data, hashlib.sha256(data).hexdigest(), time.time()),
                )
            for name in change.changed:
                endpoint = change.endpoints[name]
                tx.execute(
                    "INSERT INTO endpoints (name, type, version, target, document, modified) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "type = excluded.type, version = excluded.version, "
                    "target = excluded.target, document = excluded.document, "
                    "modified = excluded.modified",
                    (
                        name,
                        endpoint.type,
                        endpoint.version,
                        endpoint.target,
                        dump_document(endpoint),
                        generation,
                    ),
                )
                # Keep the current version and the one before (a rollback target).
                tx.execute(
                    "DELETE FROM archives WHERE name = ? AND version < ?",
                    (name, endpoint.version - 1),
                )
            self._notify(tx, generation)

    # -- users -----------------------------------------------------------------------------

    def users(self) -> dict[str, UserRecord]:
        with self.db.read() as tx:
            return _users(tx)

    def put_user(self, user: UserRecord, *, create: bool | None = None) -> None:
        """Add or replace ``user``. ``create`` True: it must be new; False: it must exist."""
        with self.db.write() as tx:
            exists = bool(tx.execute("SELECT 1 FROM users WHERE name = ?", (user.name,)))
            if create is True and exists:
                raise KeyError(f"user {user.name} already exists")
            if create is False and not exists:
                raise KeyError(f"user {user.name} does not exist")
            generation = _bump(tx)
            permissions = None if user.permissions is None else ",".join(sorted(user.permissions))
            tx.execute(
                "INSERT INTO users (name, password_hash, permissions, modified) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "password_hash = excluded.password_hash, permissions = excluded.permissions, "
                "modified = excluded.modified",
                (user.name, user.password_hash, permissions, generation),
            )
            self._notify(tx, generation)

    def delete_user(self, name: str) -> None:
        """Remove the user and revoke their keys, in one transaction: a key names its user
        by name only, so a key left active would act as anyone later given that name."""
        with self.db.write() as tx:
            if not tx.execute("SELECT 1 FROM users WHERE name = ?", (name,)):
                raise KeyError(f"user {name} does not exist")
            generation = _bump(tx)
            tx.execute("DELETE FROM users WHERE name = ?", (name,))
            tx.execute(
                "UPDATE api_keys SET revoked = ? "
                "WHERE user_name = ? AND endpoint IS NULL AND revoked IS NULL",
                (time.time(), name),
            )
            self._notify(tx, generation)

    # -- API keys --------------------------------------------------------------------------
    # Key changes bump no generation: replicas do not reload for them. Each replica re-reads
    # a key it has seen at most every fraction of a second (server.api_keys), which is what
    # makes a revocation reach every replica in time.

    def api_keys(self) -> list[ApiKeyRecord]:
        with self.db.read() as tx:
            return [_api_key(row) for row in tx.execute(f"{_KEY_SELECT} ORDER BY created, id")]

    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self.db.read() as tx:
            rows = tx.execute(f"{_KEY_SELECT} WHERE id = ?", (key_id,))
        return _api_key(rows[0]) if rows else None

    def add_api_key(self, key: ApiKeyRecord) -> None:
        with self.db.write() as tx:
            tx.execute(
                "INSERT INTO api_keys (id, secret_hash, user_name, permissions, endpoint, "
                "created, expires, revoked, last_used) VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.secret_hash,
                    key.user_name,
                    key.endpoint,
                    key.created,
                    key.expires,
                    key.revoked,
                    key.last_used,
                ),
            )

    def revoke_api_key(self, key_id: str, when: float) -> ApiKeyRecord:
        """Revoke the key (a second revocation keeps the first time); KeyError if unknown."""
        with self.db.write() as tx:
            tx.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (when, key_id),
            )
            rows = tx.execute(f"{_KEY_SELECT} WHERE id = ?", (key_id,))
        if not rows:
            raise KeyError(f"no API key has the id {key_id}")
        return _api_key(rows[0])

    def touch_api_key(self, key_id: str, when: float) -> None:
        """Record that the key was used at ``when`` (callers throttle how often)."""
        with self.db.write() as tx:
            tx.execute(
                "UPDATE api_keys SET last_used = ? WHERE id = ? AND "
                "(last_used IS NULL OR last_used < ?)",
                (when, key_id, when),
            )

    # -- service info ----------------------------------------------------------------------

    def put_service(self, values: dict[str, str], *, only_missing: bool = False) -> None:
        """Set [Service Info] keys; with ``only_missing``, keep values already there."""
        with self.db.write() as tx:
            generation = _bump(tx)
            action = "NOTHING" if only_missing else "UPDATE SET value = excluded.value"
            for key, value in values.items():
                tx.execute(
                    "INSERT INTO service_info (key, value) VALUES (?, ?) "
                    f"ON CONFLICT (key) DO {action}",
                    (key, value),
                )
            self._notify(tx, generation)

    def _notify(self, tx: Tx, generation: int) -> None:
        if self.db.dialect == "postgresql":
            tx.execute("SELECT pg_notify(?, ?)", (CHANGES_CHANNEL, str(generation)))

    def close(self) -> None:
        self.db.close()


def _generation(tx: Tx) -> int:
    return int(tx.execute("SELECT value FROM generation WHERE id = 1")[0][0])


def _bump(tx: Tx) -> int:
    return int(
        tx.execute("UPDATE generation SET value = value + 1 WHERE id = 1 RETURNING value")[0][0]
    )


def _endpoints(tx: Tx) -> dict[str, EndpointRecord]:
    result = {}
    for name, document in tx.execute("SELECT name, document FROM endpoints ORDER BY name"):
        try:
            result[name] = load_document(name, document)
        except (ValueError, TypeError) as exc:
            log.error("store: endpoint %r is unreadable and skipped: %s", name, exc)
    return result


def _service(tx: Tx) -> dict[str, str]:
    return dict(tx.execute("SELECT key, value FROM service_info"))  # type: ignore[arg-type]


def _users(tx: Tx) -> dict[str, UserRecord]:
    result = {}
    for name, password_hash, permissions in tx.execute(
        "SELECT name, password_hash, permissions FROM users ORDER BY name"
    ):
        allowed = None if permissions is None else frozenset(filter(None, permissions.split(",")))
        result[name] = UserRecord(name, password_hash, allowed)
    return result


_KEY_SELECT = (
    "SELECT id, secret_hash, user_name, endpoint, created, expires, revoked, last_used "
    "FROM api_keys"
)


def _api_key(row: tuple[Any, ...]) -> ApiKeyRecord:
    key_id, secret_hash, user_name, endpoint, created, expires, revoked, last_used = row
    return ApiKeyRecord(
        key_id, secret_hash, user_name, endpoint, created, expires, revoked, last_used
    )


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
