"""``tabserve store import`` / ``export``: copy endpoints, archives, users, API keys (their
hashes) and service info from one store to another.

The source is read and never written: a state directory is read as files (state.ini, the
archive files, and tabserve.db opened read-only if it is there), so importing from a TabPy
state directory leaves it byte for byte as it was. Users may also come from a TabPy password
file. The destination gets everything in one change, so an import that fails part-way
leaves them as they were (users follow, one by one); names it already has stop the copy
before anything is written.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from .archives import ARCHIVE_DIR_NAME, ARCHIVE_FILE
from .backends import Store, StoreError, is_store_url, open_store
from .records import ApiKeyRecord, EndpointRecord, UserRecord
from .state_dir import (
    DATABASE_FILE,
    SERVICE_INFO,
    STATE_FILE,
    ensure_state_dir,
    read_endpoints,
    read_state,
)


@dataclass
class Contents:
    """Everything a copy carries."""

    endpoints: dict[str, EndpointRecord]
    archives: dict[tuple[str, int], bytes]
    users: dict[str, UserRecord]
    service: dict[str, str] = field(default_factory=dict)
    keys: list[ApiKeyRecord] = field(default_factory=list)  # revoked ones too

    def summary(self) -> str:
        return (
            f"{len(self.endpoints)} endpoints, {len(self.archives)} archive versions, "
            f"{len(self.users)} users, {len(self.keys)} API keys"
        )


def read_contents(location: str, cache: Path) -> Contents:
    """Read a store without changing it: a state directory path or a store URL."""
    if is_store_url(location):
        store = open_store(location, cache=cache)
        try:
            snapshot = store.snapshot()
            archives = {}
            for endpoint in snapshot.endpoints.values():
                if endpoint.type != "model":
                    continue
                for version in (endpoint.version - 1, endpoint.version):
                    data = store.archive(endpoint.name, version) if version > 0 else None
                    if data is not None:
                        archives[(endpoint.name, version)] = data
            return Contents(
                snapshot.endpoints, archives, store.users(), snapshot.service, store.api_keys()
            )
        finally:
            store.close()
    return _read_state_dir(Path(location))


def _read_state_dir(path: Path) -> Contents:
    if not (path / STATE_FILE).is_file():
        raise StoreError(f"{path} is not a state directory: it has no {STATE_FILE}")
    parser = read_state(path / STATE_FILE)
    endpoints = read_endpoints(parser)
    service = dict(parser.items(SERVICE_INFO))
    archives = {}
    for endpoint in endpoints.values():
        if endpoint.type != "model":
            continue
        for version in (endpoint.version - 1, endpoint.version):
            file = path / ARCHIVE_DIR_NAME / endpoint.name / str(version) / ARCHIVE_FILE
            if file.is_file():
                archives[(endpoint.name, version)] = file.read_bytes()
        if (endpoint.name, endpoint.version) not in archives:
            raise StoreError(
                f"{path}: endpoint {endpoint.name} version {endpoint.version} has no archive "
                f"({ARCHIVE_DIR_NAME}/{endpoint.name}/{endpoint.version}/{ARCHIVE_FILE})"
            )
    database = path / DATABASE_FILE
    users = _read_users_read_only(database)
    return Contents(endpoints, archives, users, service, _read_keys_read_only(database))


def _read_rows_read_only(database: Path, query: str) -> list[tuple[object, ...]]:
    if not database.is_file():
        return []
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(query).fetchall()
    except sqlite3.OperationalError:  # no such table: an older or foreign file
        return []
    finally:
        conn.close()


def _read_users_read_only(database: Path) -> dict[str, UserRecord]:
    rows = _read_rows_read_only(database, "SELECT name, password_hash, permissions FROM users")
    return {
        name: UserRecord(name, hashed, None if perms is None else frozenset(perms.split(",")))
        for name, hashed, perms in rows  # type: ignore[misc]
    }


def _read_keys_read_only(database: Path) -> list[ApiKeyRecord]:
    rows = _read_rows_read_only(
        database,
        "SELECT id, secret_hash, user_name, endpoint, created, expires, revoked, last_used "
        "FROM api_keys ORDER BY created, id",
    )
    return [ApiKeyRecord(*row) for row in rows]  # type: ignore[arg-type]


def users_from_password_file(path: Path) -> dict[str, UserRecord]:
    """Users of a TabPy password file, hashes as they are (no password is ever needed)."""
    from .passwords import read_password_file

    return {
        entry.username: UserRecord(entry.username, entry.hash, entry.permissions)
        for entry in read_password_file(path).entries
    }


def open_destination(location: str, cache: Path) -> Store:
    """The destination store, created and migrated if new."""
    if not is_store_url(location):
        ensure_state_dir(Path(location))
    store = open_store(location, cache=cache)
    store.migrate()
    return store


def write_contents(store: Store, contents: Contents) -> None:
    """Add everything in ``contents`` to ``store``; refuses names it already has."""
    existing_users = store.users()
    existing_keys = {key.id for key in store.api_keys()}
    with store.change() as change:
        taken = sorted(set(change.endpoints) & set(contents.endpoints))
        clashing_users = sorted(set(existing_users) & set(contents.users))
        clashing_keys = sorted(existing_keys & {key.id for key in contents.keys})
        if taken or clashing_users or clashing_keys:
            raise StoreError(
                f"{store.shown} already has "
                + "; ".join(
                    part
                    for part in (
                        f"endpoints {', '.join(taken)}" if taken else "",
                        f"users {', '.join(clashing_users)}" if clashing_users else "",
                        f"API keys {', '.join(clashing_keys)}" if clashing_keys else "",
                    )
                    if part
                )
                + ": nothing was copied"
            )
        for endpoint in contents.endpoints.values():
            change.put(endpoint, contents.archives.get((endpoint.name, endpoint.version)))
        for (name, version), data in contents.archives.items():
            change.keep_archive(name, version, data)
    for user in contents.users.values():
        store.put_user(user, create=True)
    for key in contents.keys:
        store.add_api_key(key)
    if contents.service:
        store.put_service(contents.service)


def copy_store(
    source: str, destination: str, cache: Path, password_file: Path | None = None
) -> Contents:
    """Copy ``source`` into ``destination``; returns what was copied."""
    if source == destination:
        raise StoreError("the source and the destination are the same store")
    contents = read_contents(source, cache / "source")
    if password_file is not None:
        from_file = users_from_password_file(password_file)
        contents.users = {**contents.users, **from_file}
    store = open_destination(destination, cache / "destination")
    try:
        write_contents(store, contents)
    finally:
        store.close()
    return contents
